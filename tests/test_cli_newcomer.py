"""A newcomer's first hour (issue 14): each stumble, tried through the real CLI on the tiny
synthetic world, now either works or is one line naming the fix."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import bevctl
from bevctl.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--config", "toy", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def tiny_labels(tiny_synth, tmp_path_factory) -> Path:
    from test_dataset import make_label_store

    root, version = tiny_synth
    return make_label_store(root, version, tmp_path_factory.mktemp("newcomer") / "labels.zarr", resolution=(45, 80))


def _err_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("INFO ")]


def test_gt_store_of_another_grid_names_the_prepare_gt_command_and_config_builds_the_right_one(
        tiny_synth, tmp_path: Path, capsys, run_bevctl) -> None:
    root, version = tiny_synth
    data = ["--dataroot", str(root), "--version", version]
    assert run_bevctl("prepare-gt", *data, "--out", str(tmp_path / "gt.zarr"), "--workers", "0") == 0  # hdmapnet grid
    capsys.readouterr()
    assert run_bevctl("finetune", *data, "--gt", str(tmp_path / "gt.zarr"), "--out", str(tmp_path / "ft"), *TOY,
                      "--max-steps", "1") == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("error: ") and "grid" in line and "--overwrite" not in line
    assert f"bevctl prepare-gt --dataroot {root} --version {version} --grid demo --classes hdmapnet" in line
    # prepare-gt --config takes grid and classes from the training config: the store fits
    assert run_bevctl("prepare-gt", *data, "--config", "toy", "--out", str(tmp_path / "gt-demo.zarr"),
                      "--workers", "0") == 0
    assert run_bevctl("finetune", *data, "--gt", str(tmp_path / "gt-demo.zarr"), "--out", str(tmp_path / "ft"), *TOY,
                      "--max-steps", "1") == 0
    capsys.readouterr()
    assert run_bevctl("prepare-gt", *data, "--config", "toy", "--grid", "demo", "--out", str(tmp_path / "x.zarr")) == 2
    assert "either --config or --grid" in capsys.readouterr().err


def test_max_steps_beyond_the_epochs_says_which_limit_ended_the_run_and_resume_raises_it(
        tiny_synth, tiny_labels, tmp_path: Path, capsys, run_bevctl) -> None:
    root, version = tiny_synth
    run = tmp_path / "pre"
    args = ["pretrain", "--dataroot", str(root), "--version", version, "--labels", str(tiny_labels), "--out", str(run),
            *TOY, "--batch-size", "1"]
    assert run_bevctl(*args, "--max-steps", "50") == 0
    spe = json.loads((run / "run.json").read_text())["steps_per_epoch"]
    assert spe < 50 and load_checkpoint(run / "last.pt")["step"] == spe
    err = capsys.readouterr().err
    assert f"{spe} steps, not 50" in err and "--epochs" in err
    need = int(re.search(r"pass --epochs (\d+) to run 50 steps", err).group(1))
    assert need * spe >= 50 > (need - 1) * spe
    # resumed with nothing left: says so, no nan, nothing changed
    assert run_bevctl(*args, "--max-steps", "50", "--resume") == 0
    err = capsys.readouterr().err
    assert "nothing left to do" in err and "nan" not in err and load_checkpoint(run / "last.pt")["step"] == spe
    # a higher --epochs on --resume continues the run (the steps done keep their results)
    assert run_bevctl(*args, "--max-steps", "50", "--resume", "--epochs", "2") == 0
    ck = load_checkpoint(run / "last.pt")
    assert ck["step"] == 2 * spe and ck["run"]["total_steps"] == 2 * spe and ck["config"]["epochs"] == 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 2 * spe + 1))
    # an option that changes the steps already done is still refused
    assert run_bevctl(*args, "--resume", "--epochs", "3", "--lr", "0.5") == 2
    assert "lr=" in capsys.readouterr().err


def test_runs_record_absolute_paths_and_a_moved_dataset_names_the_option(
        tiny_synth, tmp_path: Path, capsys, run_bevctl, monkeypatch) -> None:
    from test_dataset import make_label_store

    src, version = tiny_synth
    shutil.copytree(src, tmp_path / "w")
    make_label_store(tmp_path / "w", version, tmp_path / "labels.zarr", resolution=(45, 80))  # records w
    monkeypatch.chdir(tmp_path)
    assert run_bevctl("pretrain", "--dataroot", "w", "--version", version, "--labels", "labels.zarr",
                      "--out", "run", *TOY, "--max-steps", "1", "--batch-size", "1") == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["dataroot"] == str(tmp_path / "w") and info["labels"] == str(tmp_path / "labels.zarr")
    # the label map the run resolved is recorded (name, source, labeler class -> BEV class)
    assert info["label_map"]["name"] == "synth" and info["label_map"]["source"] == "built in"
    assert set(info["label_map"]["table"].values()) <= {"background", "ignore", "boundary", "ped_crossing", "divider"}
    assert len(info["label_map"]["table"]) >= 5
    sample = json.loads((tmp_path / "run" / "scenes.json").read_text())["scenes"][0]
    from bevctl.data.nuscenes import load_index

    token = load_index(tmp_path / "w", version).scenes[sample][0]
    (tmp_path / "w").rename(tmp_path / "moved")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    capsys.readouterr()
    assert run_bevctl("visualize", "--checkpoint", str(tmp_path / "run"), "--sample", token, "--out", "vis",
                      "--device", "cpu") == 2
    (line,) = _err_lines(capsys)
    assert str(tmp_path / "w") in line and "--dataroot" in line
    assert run_bevctl("visualize", "--checkpoint", str(tmp_path / "run"), "--sample", token, "--out", "vis",
                      "--device", "cpu", "--dataroot", str(tmp_path / "moved")) == 0
    assert run_bevctl("labels", "show", str(tmp_path / "labels.zarr"), "--out", "x.png") == 2
    (line,) = _err_lines(capsys)
    assert str(tmp_path / "w") in line and "--dataroot" in line
    assert run_bevctl("labels", "show", str(tmp_path / "labels.zarr"), "--out", "x.png",
                      "--dataroot", str(tmp_path / "moved")) == 0


def test_synth_prints_the_version_folder_and_the_next_commands(tmp_path: Path, capsys, run_bevctl) -> None:
    out = tmp_path / "world"
    assert run_bevctl("synth", str(out), "--scenes", "1", "--samples-per-scene", "2", "--image-size", "45x80") == 0
    text = capsys.readouterr().out
    assert "v1.0-synth" in text and (out / "v1.0-synth").is_dir()
    for command in ("bevctl pseudolabel", "--model bevctl-synth", "bevctl prepare-gt", "--config demo",
                    "bevctl pretrain", "bevctl finetune"):
        assert command in text
    assert f"--dataroot {out} --version v1.0-synth" in text


def test_pseudolabel_default_model_offline_names_the_shipped_labeler(tiny_synth, tmp_path: Path, capsys,
                                                                     run_bevctl, monkeypatch) -> None:
    root, version = tiny_synth
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    assert run_bevctl("pseudolabel", "--dataroot", str(root), "--version", version, "--workers", "0",
                      "--out", str(tmp_path / "l.zarr")) == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("error: ") and "--model bevctl-synth" in line
    assert not (tmp_path / "l.zarr").exists()


def test_labeler_whose_image_processor_transformers_rejects_is_one_line_before_any_store(
        tiny_synth, tmp_path: Path, capsys, run_bevctl) -> None:
    from bevctl.pseudolabel.labeler import shipped_labeler_dir

    root, version = tiny_synth
    lab = tmp_path / "labeler"
    shutil.copytree(shipped_labeler_dir(), lab)
    conf = json.loads((lab / "preprocessor_config.json").read_text())
    conf["size"] = {"shortest_edge": "big"}  # loads, then fails on the first image
    (lab / "preprocessor_config.json").write_text(json.dumps(conf))
    for text in (json.dumps(conf), '{"size": '):
        (lab / "preprocessor_config.json").write_text(text)
        assert run_bevctl("pseudolabel", "--dataroot", str(root), "--version", version, "--workers", "0",
                          "--model", str(lab), "--out", str(tmp_path / "l.zarr")) == 2
        (line,) = _err_lines(capsys)
        assert line.startswith(f"error: {lab / 'preprocessor_config.json'}: ")
        assert not (tmp_path / "l.zarr").exists()


def test_boolean_flags_read_as_flags_and_a_bad_value_is_one_error_line(capsys, run_bevctl) -> None:
    assert run_bevctl("pretrain", "--help") == 0
    text = capsys.readouterr().out
    assert "<bool>" not in text and "--resume / --no-resume" in text
    assert run_bevctl("pretrain", "--dataroot", "d", "--labels", "l", "--out", "o", "--resume", "true") == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("error: ") and "true" in line and "bevctl pretrain --help" in line
    assert run_bevctl("finetune", "--dataroot", "d", "--out", "o", "--batch-size", "two") == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("error: ") and "--batch-size" in line
    assert run_bevctl("--version") == 0
    assert capsys.readouterr().out.strip() == f"bevctl {bevctl.__version__}"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about the fake file
def test_a_file_that_is_no_checkpoint_never_suggests_weights_only_false(tiny_synth, tmp_path: Path, capsys,
                                                                        run_bevctl) -> None:
    root, version = tiny_synth
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"\x80\x04K\x01.")  # a pickle, not a checkpoint
    for command in (["evaluate", "--dataroot", str(root), "--version", version],
                    ["visualize", "--sample", "x", "--out", str(tmp_path / "vis")]):
        assert run_bevctl(*command, "--checkpoint", str(fake), "--device", "cpu") == 2
        (line,) = _err_lines(capsys)
        assert line.startswith(f"error: {fake}: not a") and "weights_only" not in line and "False" not in line


def test_help_shows_preset_defaults_and_the_whole_model_default(capsys, run_bevctl) -> None:
    for command in ("pretrain", "finetune"):
        assert run_bevctl(command, "--help") == 0
        text = " ".join(capsys.readouterr().out.split())
        for option, value in (("--epochs", 1), ("--batch-size", 2), ("--lr", 0.001), ("--workers", 2)):
            assert re.search(re.escape(option) + r" <\w+> .*?\[default: from the preset \(demo: "
                             + re.escape(str(value)) + r"\)\]", text), (command, option)
    assert run_bevctl("pseudolabel", "--help") == 0
    text = "".join(capsys.readouterr().out.split())  # wrapped lines joined
    assert "[default:facebook/mask2former-swin-large-mapillary-vistas-semantic]" in text


def test_readme_marks_optional_options_and_puts_install_and_commands_first() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `bevctl ")]
    finetune = next(r for r in rows if r.startswith("| `bevctl finetune"))
    assert "[--fraction F]" in finetune and "[--gt gt.zarr]" in finetune
    prepare = next(r for r in rows if r.startswith("| `bevctl prepare-gt"))
    assert "[--config PRESET|FILE]" in prepare.replace("\\|", "|") or "[--grid G]" in prepare
    install, commands = readme.index("## Install"), readme.index("## Commands")
    first_table = readme.index("| BEV labels |")
    assert install < commands < first_table
