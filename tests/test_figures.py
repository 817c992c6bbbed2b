"""Figures on the tiny synthetic world: sizes, panels, legend colours, the error view, camera
names, the fine-tuned run's missing pseudo-labels, animation frames, `bevctl samples`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bevctl import render
from bevctl.config import class_set_from_name, grid_from_name
from bevctl.data.nuscenes import load_index
from bevctl.data.records import CAMERAS

from test_predict import train_toy_runs

GRID = grid_from_name("demo")
NAMES = class_set_from_name("hdmapnet").names_with_background


@pytest.fixture(scope="module")
def toy_runs(tiny_synth, tmp_path_factory) -> dict[str, Path]:
    root, version = tiny_synth
    return train_toy_runs(root, version, tmp_path_factory.mktemp("toy_runs"))


def _legend_colours(fig) -> dict[str, tuple[float, ...]]:
    return {t.get_text(): tuple(h.get_facecolor()[:3]) for leg in fig.legends
            for t, h in zip(leg.get_texts(), leg.legend_handles)}


def test_error_map_and_counts() -> None:
    gt = np.array([[0, 1, 1, 2, 0, 3]], np.uint8)
    pred = np.array([[0, 1, 0, 3, 2, 3]], np.uint8)
    assert render.error_map(pred, gt).tolist() == [[render.TN, render.TP, render.FN, render.WRONG, render.FP, render.TP]]
    counts = render.class_counts(pred, gt, NAMES)
    assert counts["boundary"] == {"tp": 1, "fp": 0, "fn": 1, "iou": 0.5}
    assert counts["ped_crossing"] == {"tp": 0, "fp": 1, "fn": 1, "iou": 0.0}
    assert counts["divider"]["iou"] == 0.5  # TP 1, FP 1 (the wrong-class cell)
    gt[0, 0] = 255
    assert render.error_map(pred, gt)[0, 0] == 255  # ignore stays ignore


def test_bev_figure_panels_legend_axes_and_ego() -> None:
    gt = np.zeros(GRID.shape, np.uint8)
    gt[:, 30:32] = 3  # a divider along x, just left of the ego
    pred = gt.copy()
    pred[:64] = 0  # the rear half missed
    fig = render.bev_figure([render.BevMap("prediction", pred, gt), render.BevMap("ground truth", gt)], GRID, NAMES,
                            "a sample")
    axes = fig.axes
    assert [a.get_title().split("\n")[0] for a in axes] == ["prediction", "errors of prediction", "ground truth"]
    assert "mIoU 50%" in axes[1].get_title()  # divider: half found, no false positives
    for ax in axes:  # metres on both axes, x forward up, y left to the left (extent of the grid)
        left, right = ax.get_xlim()
        bottom, top = ax.get_ylim()
        assert (left, right, bottom, top) == (GRID.y_max, GRID.y_min, GRID.x_min, GRID.x_max)
        assert len(ax.patches) == 2  # the ego: its box and heading
    assert axes[0].get_xlabel().startswith("y (m") and axes[0].get_ylabel().startswith("x (m")
    colours = _legend_colours(fig)
    for k, name in enumerate(NAMES):  # the legend's colours are the classes' colours
        assert colours[name] == pytest.approx(tuple(render.PALETTE[k] / 255.0))
    assert colours["FN (missed class)"] == pytest.approx(tuple(render.ERROR_RGB[render.FN] / 255.0))
    # the panel shows the map the right way round: the divider at y ~ -0.25..0.25 m left of centre
    image = axes[0].get_images()[0].get_array()
    assert image.shape == (*GRID.shape, 3)
    front_row = image[0]  # x max (front)
    assert (front_row[64 - 32:64 - 30] == render.PALETTE[3]).all()


def test_png_size_is_the_figure_size(tmp_path: Path) -> None:
    ids = np.zeros(GRID.shape, np.uint8)
    fig = render.bev_figure([render.BevMap("a", ids, ids), render.BevMap("b", ids)], GRID, NAMES)
    path = render.save_png(fig, tmp_path / "x.png")
    w, h = fig.get_size_inches() * render.DPI
    assert Image.open(path).size == (round(w), round(h))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically, no temp left


def test_cameras_figure_names_columns_and_says_why_a_column_is_empty() -> None:
    images = [np.full((45, 80, 3), 100, np.uint8)] * 6
    fig = render.cameras_figure([render.CameraColumn("camera image", images),
                                 render.CameraColumn("pseudo-labels", None, "no pseudo-labels here")], CAMERAS, NAMES)
    axes = np.array(fig.axes).reshape(6, 2)
    assert [a.get_title() for a in axes[0]] == ["camera image", "pseudo-labels"]
    assert [a.get_ylabel() for a in axes[:, 0]] == [c.replace("CAM_", "") for c in CAMERAS]
    assert "no pseudo-labels here" in [t.get_text() for t in axes[0, 1].texts]
    assert not axes[0, 1].get_images()  # a message, not a black image


def test_visualize_by_scene_index_writes_readable_pngs(tiny_synth, toy_runs, tmp_path: Path, run_bevctl, capsys) -> None:
    root, version = tiny_synth
    out = tmp_path / "vis"
    assert run_bevctl("visualize", "--checkpoint", str(toy_runs["fin"]), "--sample", "scene-0002:3", "--out", str(out),
                      "--device", "cpu") == 0
    legend = json.loads((out / "legend.json").read_text())
    index = load_index(root, version)
    assert legend["sample"] == index.scenes["scene-0002"][3] and legend["pseudo_labels"] is False
    assert legend["classes"]["divider"] == [int(v) for v in render.PALETTE[3]]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(["bev.png", "cameras.png", *[f"cam_{c}.png" for c in CAMERAS]])
    bev = np.asarray(Image.open(out / "bev.png").convert("RGB"))
    assert bev.shape[1] > bev.shape[0] * 0.8  # three panels side by side, not a thin strip
    # a fine-tuned run without pseudo-labels: the column says so instead of being solid black
    cams = np.asarray(Image.open(out / "cameras.png").convert("RGB"))
    right = cams[:, 2 * cams.shape[1] // 3 + 20:-20]
    assert (right == 0).all(axis=-1).mean() < 0.05
    # with the pretraining run's pseudo-labels the third column shows them
    assert run_bevctl("visualize", "--checkpoint", str(toy_runs["pre"]), "--sample", "scene-0002:1", "--out",
                      str(tmp_path / "pre"), "--device", "cpu") == 0
    assert json.loads((tmp_path / "pre" / "legend.json").read_text())["pseudo_labels"] is True
    capsys.readouterr()
    assert run_bevctl("visualize", "--checkpoint", str(toy_runs["fin"]), "--sample", "scene-0002:7", "--out",
                      str(tmp_path / "x"), "--device", "cpu") == 2
    assert "keyframes 0..3" in capsys.readouterr().err


def test_scene_animation_has_one_frame_per_sample(tiny_synth, toy_runs, tmp_path: Path, run_bevctl, capsys) -> None:
    root, version = tiny_synth
    gif = tmp_path / "drive.gif"
    assert run_bevctl("visualize", "--models", f"{toy_runs['pre']},{toy_runs['fin']}", "--scene", "scene-0001",
                      "--out", str(gif), "--device", "cpu") == 0
    frames = Image.open(gif)
    assert frames.n_frames == len(load_index(root, version).scenes["scene-0001"]) == 4
    single = tmp_path / "one.gif"
    assert run_bevctl("visualize", "--checkpoint", str(toy_runs["fin"]), "--scene", "scene-0001", "--out", str(single),
                      "--device", "cpu") == 0
    assert Image.open(single).size[0] < frames.size[0]  # two models side by side make a wider frame
    mp4 = tmp_path / "drive.mp4"
    assert run_bevctl("visualize", "--checkpoint", str(toy_runs["fin"]), "--scene", "scene-0001", "--out", str(mp4),
                      "--device", "cpu") == 0
    import cv2

    video = cv2.VideoCapture(str(mp4))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    capsys.readouterr()
    assert run_bevctl("visualize", "--checkpoint", str(toy_runs["fin"]), "--scene", "scene-0001", "--out",
                      str(tmp_path / "a.avi"), "--device", "cpu") == 2
    assert ".gif or .mp4" in capsys.readouterr().err
    assert run_bevctl("visualize", "--checkpoint", str(toy_runs["fin"]), "--scene", "nope", "--out",
                      str(tmp_path / "b.gif"), "--device", "cpu") == 2
    assert "no scene 'nope'" in capsys.readouterr().err


def test_samples_lists_scenes_and_tokens_per_split(tiny_synth, run_bevctl, capsys) -> None:
    root, version = tiny_synth
    index = load_index(root, version)
    capsys.readouterr()
    assert run_bevctl("samples", "--dataroot", str(root), "--version", version, "--split", "val") == 0
    out = capsys.readouterr().out
    (scene,) = index.split_scenes["val"]
    for i, token in enumerate(index.scenes[scene]):
        assert f"{scene}:{i}  {token}" in out
        assert index.find_sample(f"{scene}:{i}").token == token
    assert run_bevctl("samples", "--dataroot", str(root), "--version", version) == 0
    assert "split train" in capsys.readouterr().out
