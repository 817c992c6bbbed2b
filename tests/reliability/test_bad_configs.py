"""Bad configuration, command by command: YAML files with unknown keys, wrong types or
impossible values (training configs, BEV grids, class sets) and impossible CLI options. Each
is refused with one ``error:`` line naming the file or option and the key, before anything is
written."""

from __future__ import annotations

import pytest

TRAIN = ["--device", "cpu", "--max-steps", "1", "--workers", "0"]

# YAML text of a training config -> words the error must name (besides the file)
TRAIN_CONFIGS = {
    "unknown-key": ("model: toy\nlearning_rate: 0.1\n", ["learning_rate", "unknown key"]),
    "wrong-type": ("model: toy\nlr: fast\n", ["lr", "'fast'"]),
    "wrong-type-list": ("model: toy\nimage_hw: 64\n", ["image_hw"]),
    "negative-lr": ("model: toy\nlr: -0.001\n", ["lr must be > 0"]),
    "zero-batch": ("model: toy\nbatch_size: 0\n", ["batch_size"]),
    "fraction-zero": ("model: toy\nfraction: 0\n", ["fraction", "(0, 1]"]),
    "fraction-above-one": ("model: toy\nfraction: 1.5\n", ["fraction", "1.5"]),
    "fraction-negative": ("model: toy\nfraction: -0.1\n", ["fraction", "-0.1"]),
    "image-size-zero": ("model: toy\nimage_hw: [0, 64]\n", ["image_hw"]),
    "unknown-model": ("model: huge\n", ["huge"]),
    "unknown-grid": ("model: toy\ngrid: moon\n", ["moon"]),
    "unknown-class-set": ("model: toy\nclass_set: nothing\n", ["nothing"]),
    "not-a-mapping": ("- model\n- toy\n", ["mapping"]),
    "invalid-yaml": ("model: [toy\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CONFIGS))
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_bad_train_config_file(command, case, tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    text, needles = TRAIN_CONFIGS[case]
    cfg = tmp_path / "train.yaml"
    cfg.write_text(text)
    out = tmp_path / "run"
    extra = ["--labels", tmp_path / "labels.zarr"] if command == "pretrain" else []
    res = bevctl_cli(command, "--dataroot", root, "--version", version, *extra, "--config", cfg, *TRAIN, "--out", out)
    line = res.assert_refused(*needles)
    assert str(cfg) in line or case in ("unknown-model", "unknown-grid", "unknown-class-set"), line
    res.assert_nothing_written(out)


def test_missing_config_file_and_unknown_preset(tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    out = tmp_path / "run"
    data = ["--dataroot", root, "--version", version]
    bevctl_cli("finetune", *data, "--config", tmp_path / "nope.yaml", *TRAIN, "--out", out).assert_refused(
        "config file not found", "nope.yaml")
    bevctl_cli("finetune", *data, "--config", "hdmapnet-xl", *TRAIN, "--out", out).assert_refused(
        "hdmapnet-xl", "neither a preset")
    assert not out.exists()


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.1", "nan"])
def test_fraction_option_outside_0_1(fraction, tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    out = tmp_path / "run"
    res = bevctl_cli("finetune", "--dataroot", root, "--version", version, "--config", "toy", "--fraction", fraction,
                     *TRAIN, "--out", out)
    res.assert_refused("fraction", "(0, 1]")
    res.assert_nothing_written(out)


@pytest.mark.parametrize("option, value, needle", [
    ("--batch-size", "0", "batch_size"), ("--lr", "0", "lr"), ("--epochs", "0", "epochs"),
    ("--max-steps", "-1", "max_steps"), ("--gpus", "0", "--gpus"), ("--checkpoint-every", "0", "checkpoint_every"),
])
def test_bad_training_options(option, value, needle, tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    out = tmp_path / "run"
    args = ["finetune", "--dataroot", root, "--version", version, "--config", "toy", "--device", "cpu",
            "--workers", "0", option, value, "--out", out]
    bevctl_cli(*args).assert_refused(needle)
    assert not out.exists()


GRIDS = {
    "negative-resolution": ("x_min: -8\nx_max: 8\ny_min: -4\ny_max: 4\nresolution: -0.25\n", ["resolution must be > 0"]),
    "zero-resolution": ("x_min: -8\nx_max: 8\ny_min: -4\ny_max: 4\nresolution: 0\n", ["resolution must be > 0"]),
    "empty-extent": ("x_min: 8\nx_max: -8\ny_min: -4\ny_max: 4\nresolution: 0.25\n", ["empty extent"]),
    "ragged-cells": ("x_min: -8\nx_max: 8\ny_min: -4\ny_max: 4\nresolution: 0.3\n", ["whole number"]),
    "unknown-key": ("x_min: -8\nx_max: 8\ny_min: -4\ny_max: 4\nresolution: 0.25\ncell: 1\n", ["cell", "unknown key"]),
    "missing-key": ("x_min: -8\nx_max: 8\ny_min: -4\ny_max: 4\n", ["resolution"]),
    "wrong-type": ("x_min: -8\nx_max: 8\ny_min: -4\ny_max: 4\nresolution: fine\n", ["resolution", "'fine'"]),
}
CLASS_SETS = {
    "empty-class-set": ("name: none\nclasses: []\nlayers: {}\n", ["empty class list"]),
    "duplicate-class": ("name: dup\nclasses: [divider, divider]\nlayers:\n  divider: {lines: [lane_divider]}\n",
                        ["duplicate"]),
    "class-without-layers": ("name: x\nclasses: [divider, zebra]\nlayers:\n  divider: {lines: [lane_divider]}\n",
                             ["zebra"]),
    "negative-line-width": ("name: x\nclasses: [divider]\nlayers:\n  divider: {lines: [lane_divider]}\n"
                            "line_width_m: -1\n", ["line_width_m"]),
    "unknown-key": ("name: x\nclasses: [divider]\nlayers:\n  divider: {lines: [lane_divider]}\ncolour: red\n",
                    ["colour"]),
}


@pytest.mark.parametrize("case", list(GRIDS))
def test_prepare_gt_bad_grid_file(case, tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRIDS[case][0])
    out = tmp_path / "gt.zarr"
    res = bevctl_cli("prepare-gt", "--dataroot", root, "--version", version, "--grid", grid, "--classes",
                     "hdmapnet", "--workers", "0", "--out", out)
    res.assert_refused(*GRIDS[case][1])
    res.assert_nothing_written(out)


@pytest.mark.parametrize("case", list(CLASS_SETS))
def test_prepare_gt_bad_class_set_file(case, tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    classes = tmp_path / "classes.yaml"
    classes.write_text(CLASS_SETS[case][0])
    out = tmp_path / "gt.zarr"
    res = bevctl_cli("prepare-gt", "--dataroot", root, "--version", version, "--grid", "demo", "--classes", classes,
                     "--workers", "0", "--out", out)
    res.assert_refused(*CLASS_SETS[case][1])
    res.assert_nothing_written(out)


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "--batch-size"), (["--workers", "-1"], "--workers"), (["--resolution", "0x80"], "--resolution"),
    (["--resolution", "big"], "--resolution"), (["--on-error", "ignore"], "--on-error"),
    (["--splits", "test"], "test"), (["--model", "sleep:-1"], "sleep:-1"), (["--model", "<empty dir>"], "no config.json"), (["--model", "<missing dir>"], "model directory not found"),
])
def test_pseudolabel_bad_options(args, needle, tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    out = tmp_path / "labels.zarr"
    base = ["pseudolabel", "--dataroot", root, "--version", version, "--workers", "0"]
    if "--model" not in args:
        base += ["--model", "synth-gt"]
    # a directory path that exists but holds no save_pretrained files / one that does not exist
    # (absolute, so the case does not depend on the directory the tests run from)
    (tmp_path / "empty_model").mkdir()
    paths = {"<empty dir>": str(tmp_path / "empty_model"), "<missing dir>": str(tmp_path / "no_such_model")}
    args = [paths.get(a, a) for a in args]
    bevctl_cli(*base, *args, "--out", out).assert_refused(needle)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--scenes", "0"], "--scenes"), (["--samples-per-scene", "0"], "--samples-per-scene"),
    (["--image-size", "8x8"], "--image-size"), (["--version", "v1/../x"], "--version"),
])
def test_synth_bad_options(args, needle, bevctl_cli, tmp_path) -> None:
    out = tmp_path / "world"
    bevctl_cli("synth", out, *args).assert_refused(needle)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_prepare_gt_bad_options(tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    out = tmp_path / "gt.zarr"
    data = ["prepare-gt", "--dataroot", root, "--version", version, "--out", out]
    bevctl_cli(*data, "--workers", "-2").assert_refused("--workers")
    bevctl_cli(*data, "--grid", "moon").assert_refused("moon")
    bevctl_cli(*data, "--grid", "demo", "--splits", "mini_val").assert_refused("mini_val")
    assert not out.exists()
