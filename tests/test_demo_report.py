"""The demo report's figures and its reading order, with toy models on the tiny world
(the whole demo is tests/test_demo.py, slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bevctl.demo import DemoPlan, Paths, _pictures, _report_md

from test_predict import train_toy_runs


@pytest.mark.slow
def test_report_reads_table_samples_reprojection_animation(tiny_synth, tmp_path: Path) -> None:
    root, version = tiny_synth
    runs = train_toy_runs(root, version, tmp_path / "runs")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "synth").symlink_to(root)
    (demo / "gt.zarr").symlink_to(runs["gt"])
    from bevctl.data.nuscenes import load_index

    index = load_index(root, version)
    pics = _pictures(Paths(demo), index, {"baseline": runs["fin"], "pretrained + fine-tuned": runs["fin"]},
                     runs["pre"], runs["labels"])
    val = index.samples_in("val")
    assert [p.name for p in pics.comparisons] == [f"{val[i].scene_name}_{i}.png" for i in (0, 2, 3)]
    # GT | baseline + errors | pretrained + fine-tuned + errors: wider than tall
    w, h = Image.open(pics.comparisons[0]).size
    assert w > 1.5 * h
    assert pics.reprojection.name == "cameras.png" and pics.animation.suffix == ".gif"
    assert Image.open(pics.animation).n_frames == len(index.scenes[val[0].scene_name])
    assert all(p.is_file() for p in pics.all())
    report = {"shared_wall_seconds": {"synth": 1.0}, "rules": "r",
              "figures": {"comparisons": [str(p.relative_to(demo)) for p in pics.comparisons],
                          "reprojection": str(pics.reprojection.relative_to(demo)),
                          "animation": str(pics.animation.relative_to(demo))}}
    entry = {"name": "m", "bev_label_fraction": 1.0, "pretrained": False, "miou": 0.5,
             "iou_per_class": {"divider": 0.5}, "wall_seconds": {"finetune": 1.0, "total": 1.0}}
    plan = DemoPlan(scenes=2, samples_per_scene=4, image_hw=(90, 160), label_hw=(45, 80), pretrain_steps=1,
                    finetune_steps=1, baseline_steps=1)
    md = _report_md(report, [entry], plan, demo)
    order = [md.index(x) for x in ("| model |", "## Val samples", "![", "## Reprojection", "cameras.png", "## A drive",
                                   ".gif")]
    assert order == sorted(order)
    assert md.count("![") == len(pics.comparisons) + 1  # a figure per sample + the reprojection, no bare image list
    for rel in report["figures"]["comparisons"]:
        assert (demo / rel).is_file() and f"({rel})" in md
