"""Untrusted files: checkpoints of another preset, truncated checkpoints, a crafted pickle that
would run code when loaded, and a Hugging Face model directory that asks for remote code.
Each is refused with one ``error:`` line naming the file; the crafted ones never run code
(``torch.load(weights_only=True)``, ``trust_remote_code=False``): their marker file never
appears."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from bevctl.train.checkpoint import load_checkpoint


class _RunsCode:
    """Unpickling this calls ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_checkpoint(path: Path, marker: Path, how: str) -> Path:
    payload = {"model": {"w": torch.zeros(1)}, "config": {"model": "toy"}, "hook": _RunsCode(f"touch {marker}")}
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _other_preset(src: Path, dst: Path) -> Path:
    """The toy run's weights under a config that says it is the demo BEVFormer."""
    ckpt = load_checkpoint(src)
    ckpt["config"]["model"] = "demo"
    torch.save(ckpt, dst)
    return dst


def _uses(command: str, ckpt: Path, root: Path, version: str, tmp: Path) -> tuple[list[object], Path]:
    data = ["--dataroot", root, "--version", version]
    if command == "evaluate":
        out = tmp / "eval.json"
        return ["evaluate", "--checkpoint", ckpt, *data, "--device", "cpu", "--workers", "0", "--out", out], out
    if command == "visualize":
        out = tmp / "vis"
        return ["visualize", "--checkpoint", ckpt, "--sample", "x", *data, "--device", "cpu", "--out", out], out
    if command == "finetune-init":
        out = tmp / "run"
        return ["finetune", *data, "--init", ckpt, "--device", "cpu", "--workers", "0", "--max-steps", "1",
                "--out", out], out
    if command == "finetune-init-config":  # an explicit config: the weights must fit it
        out = tmp / "run"
        return ["finetune", *data, "--init", ckpt, "--config", "demo", "--device", "cpu", "--workers", "0",
                "--max-steps", "1", "--out", out], out
    raise ValueError(command)


CHECKPOINT_USES = ["evaluate", "visualize", "finetune-init"]


@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
@pytest.mark.parametrize("command", CHECKPOINT_USES)
def test_crafted_pickle_checkpoint_never_runs(command, how, tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker, how)
    args, out = _uses(command, evil, root, version, tmp_path)
    bevctl_cli(*args).assert_refused(evil, "not a readable bevctl checkpoint")
    assert not marker.exists(), "the crafted checkpoint ran code on load"
    assert not out.exists()


def test_crafted_last_pt_on_resume_never_runs(tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    evil = _evil_checkpoint(run / "last.pt", marker, "torch.save")
    res = bevctl_cli("finetune", "--dataroot", root, "--version", version, "--config", "toy", "--device", "cpu",
                     "--workers", "0", "--max-steps", "1", "--resume", "--out", run)
    res.assert_refused(evil, "not a readable bevctl checkpoint")
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("command", CHECKPOINT_USES)
def test_truncated_checkpoint(command, tiny_synth, toy_checkpoint, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    bad = _truncated(toy_checkpoint, tmp_path / "ckpt" / "torn.pt")
    args, out = _uses(command, bad, root, version, tmp_path)
    bevctl_cli(*args).assert_refused(bad, "not a readable bevctl checkpoint")
    assert not out.exists()


def test_not_a_bevctl_checkpoint(tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    plain = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    args, out = _uses("evaluate", plain, root, version, tmp_path)
    bevctl_cli(*args).assert_refused(plain, "not a bevctl checkpoint")
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "visualize", "finetune-init-config"])
def test_checkpoint_of_another_preset(command, tiny_synth, toy_checkpoint, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    ckpt = toy_checkpoint if command == "finetune-init-config" else _other_preset(toy_checkpoint, tmp_path / "o.pt")
    args, out = _uses(command, ckpt, root, version, tmp_path)
    bevctl_cli(*args).assert_refused(ckpt, "do not fit")
    # evaluate/visualize write nothing; finetune may have recorded its scene choice, never a checkpoint
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["scenes.json"]


# ---- Hugging Face model directories ----------------------------------------------------------


def _remote_code_dir(tmp_path: Path, marker: Path) -> Path:
    """The shipped labeler's files, with a config asking for remote code that would create
    ``marker`` when imported."""
    from bevctl.pseudolabel.labeler import shipped_labeler_dir

    model = tmp_path / "remote-code-model"
    shutil.copytree(shipped_labeler_dir(), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return model


def test_pseudolabel_refuses_remote_code_model(tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    marker = tmp_path / "pwned"
    model = _remote_code_dir(tmp_path, marker)
    out = tmp_path / "labels.zarr"
    res = bevctl_cli("pseudolabel", "--dataroot", root, "--version", version, "--model", model, "--workers", "0",
                     "--out", out)
    res.assert_refused(model / "config.json", "remote code")
    assert not marker.exists() and not out.exists()


def test_train_labeler_refuses_remote_code_init(bevctl_cli, tmp_path) -> None:
    marker = tmp_path / "pwned"
    model = _remote_code_dir(tmp_path, marker)
    out = tmp_path / "labeler"
    res = bevctl_cli("train-labeler", "--out", out, "--work", tmp_path / "work", "--init", model, "--steps", "1")
    res.assert_refused(model / "config.json", "remote code")
    assert not marker.exists() and not out.exists()
    assert not (tmp_path / "work").exists()  # refused before generating any training data


def test_crafted_pickle_in_a_real_process(tiny_synth, tmp_path) -> None:
    """The same refusal through the installed entry point in its own process (real stderr)."""
    import subprocess
    import sys

    root, version = tiny_synth
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker, "torch.save")
    env = dict(os.environ, BEVCTL_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bevctl.cli", "evaluate", "--checkpoint", str(evil), "--dataroot",
                           str(root), "--version", version, "--device", "cpu", "--out", str(tmp_path / "e.json")],
                          capture_output=True, text=True, timeout=300, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and str(evil) in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not marker.exists() and not (tmp_path / "e.json").exists()
