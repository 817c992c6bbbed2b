"""BEV segmentation metrics on hand-computed confusion matrices: IoU = TP / (TP + FP + FN),
mIoU without background, the confusion's orientation (rows = GT, columns = prediction), the
ignore label and the distance bands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bevctl.config import BEVGrid
from bevctl.errors import BevctlError
from bevctl.train import evaluate as ev

NAMES = ("background", "a", "b")
# rows: ground truth, columns: prediction
CONF = np.array([
    [50, 2, 3],
    [4, 6, 0],
    [1, 5, 9],
])  # fmt: skip


def test_iou_from_a_hand_computed_confusion_matrix() -> None:
    r = ev.iou_from_confusion(CONF, NAMES)
    # class a: TP 6; FP = predicted a but not a = 2 + 5 = 7; FN = a predicted as other = 4 + 0 = 4
    assert r["classes"]["a"] == {"iou": pytest.approx(6 / 17), "tp": 6, "fp": 7, "fn": 4, "gt_cells": 10}
    # class b: TP 9; FP = 3 + 0 = 3; FN = 1 + 5 = 6
    assert r["classes"]["b"] == {"iou": pytest.approx(9 / 18), "tp": 9, "fp": 3, "fn": 6, "gt_cells": 15}
    assert r["classes"]["background"] == {"iou": pytest.approx(50 / 60), "tp": 50, "fp": 5, "fn": 5, "gt_cells": 55}
    assert r["background_iou"] == pytest.approx(50 / 60)
    # mIoU: the mean over the BEV classes, background left out (with it: (50/60 + 6/17 + 1/2) / 3)
    assert r["miou"] == pytest.approx((6 / 17 + 1 / 2) / 2)


def test_class_absent_from_gt_and_prediction_is_null_and_left_out_of_the_mean() -> None:
    conf = np.array([[7, 1, 0], [2, 4, 0], [0, 0, 0]])
    r = ev.iou_from_confusion(conf, NAMES)
    assert r["classes"]["b"]["iou"] is None and r["classes"]["b"]["gt_cells"] == 0
    assert r["classes"]["a"]["iou"] == pytest.approx(4 / 7)
    assert r["miou"] == pytest.approx(4 / 7)  # not (4/7 + 0) / 2
    # a class that is predicted but never in the GT is a real 0, and counts
    conf[0, 2] = 3
    r = ev.iou_from_confusion(conf, NAMES)
    assert r["classes"]["b"]["iou"] == 0.0 and r["classes"]["b"]["fp"] == 3
    assert r["miou"] == pytest.approx(4 / 14)
    # a class seen in one single cell, found: IoU 1; missed: IoU 0
    assert ev.iou_from_confusion(np.array([[5, 0, 0], [0, 1, 0], [0, 0, 0]]), NAMES)["miou"] == 1.0
    assert ev.iou_from_confusion(np.array([[5, 0, 0], [1, 0, 0], [0, 0, 0]]), NAMES)["miou"] == 0.0
    # nothing but background: no mIoU at all
    assert ev.iou_from_confusion(np.array([[5, 0, 0], [0, 0, 0], [0, 0, 0]]), NAMES)["miou"] is None


def test_confusion_rows_are_ground_truth_and_ignore_cells_are_skipped() -> None:
    gt = torch.tensor([[[0, 1, 1, 2], [255, 2, 2, 0]]])  # (B=1, X=2, Y=4)
    pred = torch.tensor([[[0, 1, 2, 2], [1, 0, 2, 0]]])
    bands = torch.zeros(2, 4, dtype=torch.int64)
    bands[1] = 1  # the second row of cells is in band 1
    conf = torch.zeros(2, 3, 3, dtype=torch.int64)
    ev.update_confusion_by_band(conf, pred, gt, bands)
    want = np.zeros((2, 3, 3), dtype=np.int64)
    want[0, 0, 0] = 1  # band 0: gt 0 -> 0, gt 1 -> 1, gt 1 -> 2, gt 2 -> 2
    want[0, 1, 1] = 1
    want[0, 1, 2] = 1
    want[0, 2, 2] = 1
    want[1, 2, 0] = 1  # band 1: gt 255 skipped, gt 2 -> 0, gt 2 -> 2, gt 0 -> 0
    want[1, 2, 2] = 1
    want[1, 0, 0] = 1
    np.testing.assert_array_equal(conf.numpy(), want)
    ev.update_confusion_by_band(conf, pred, gt, bands)  # counts accumulate
    np.testing.assert_array_equal(conf.numpy(), 2 * want)
    # cells of the first band and classes only: the counts still fill the whole (K, C, C) array
    near = torch.zeros(2, 3, 3, dtype=torch.int64)
    ev.update_confusion_by_band(near, torch.zeros(1, 2, 4, dtype=torch.long), torch.zeros(1, 2, 4, dtype=torch.long),
                                torch.zeros(2, 4, dtype=torch.int64))
    assert near[0, 0, 0] == 8 and int(near.sum()) == 8
    # class 1: one cell right (TP), one GT-1 cell predicted 2 (FN), none wrongly predicted 1 in
    # band 0; the band-1 cell with GT 255 predicted 1 is not a false positive
    r = ev.iou_from_confusion(conf.sum(0).numpy(), NAMES)["classes"]["a"]
    assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 2)


def test_range_bands_by_distance_of_the_cell_centre() -> None:
    grid = BEVGrid(-4.0, 4.0, -1.0, 1.0, 1.0)  # cell centres x = -3.5 .. 3.5, y = -0.5, 0.5
    assert ev.default_range_edges(grid) == (1.0, 2.0, 3.0)
    bands = ev.range_bands(grid, (1.0, 2.0, 3.0))
    x = torch.arange(-3.5, 4.0, 1.0)
    dist = torch.sqrt(x**2 + 0.25)  # |y| = 0.5 for both columns
    want = (dist >= 1).long() + (dist >= 2).long() + (dist >= 3).long()
    assert torch.equal(bands, want.view(-1, 1).expand(-1, 2))
    # a centre exactly on an edge belongs to the outer band
    on_edge = ev.range_bands(BEVGrid(0.0, 2.0, -0.5, 0.5, 1.0), (0.5, 1.5))  # centres at x = 0.5, 1.5, y = 0
    assert on_edge.flatten().tolist() == [1, 2]
    for bad in ((2.0, 1.0), (0.0, 1.0), (1.0, 1.0), (-1.0,)):
        with pytest.raises(BevctlError, match="positive and increasing"):
            ev.check_range_edges(bad)


def test_by_range_results_one_entry_per_band() -> None:
    conf = np.stack([CONF, np.diag([3, 0, 2])])
    out = ev.by_range_results(conf, (4.0,), NAMES)
    assert [(o["min_m"], o["max_m"]) for o in out] == [(0.0, 4.0), (4.0, None)]
    assert out[0]["cells"] == int(CONF.sum()) and out[1]["cells"] == 5
    assert out[0]["miou"] == pytest.approx((6 / 17 + 1 / 2) / 2)
    assert out[1]["iou"] == {"background": 1.0, "a": None, "b": 1.0} and out[1]["miou"] == 1.0


def test_markdown_report_is_the_hand_computed_table() -> None:
    r = ev.iou_from_confusion(CONF, NAMES)
    bands = ev.by_range_results(np.stack([CONF, np.diag([3, 0, 2])]), (4.0,), NAMES)
    result = {"split": "val", "num_samples": 3, "checkpoint": "run/ckpt", "rules": ev.RULES, **r, "by_range": bands}
    assert ev.format_markdown(result) == f"""**val** (3 samples) — checkpoint `run/ckpt`

| class | IoU % | GT cells |
|---|---:|---:|
| background | 83.3 | 55 |
| a | 35.3 | 10 |
| b | 50.0 | 15 |
| **mIoU** (without background) | **42.6** | |

By distance from the ego (IoU %):

| range | a | b | mIoU | cells |
|---|---:|---:|---:|---:|
| 0-4 m | 35.3 | 50.0 | 42.6 | 80 |
| 4- m | n/a | 100.0 | 100.0 | 5 |

Rules: {ev.RULES}.
"""
    assert "IoU = TP/(TP+FP+FN)" in ev.RULES and "without background" in ev.RULES
    empty = ev.format_markdown({**result, "miou": None, "by_range": []})
    assert "| **mIoU** (without background) | **n/a** | |" in empty and "By distance" not in empty
