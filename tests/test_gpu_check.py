"""bench/gpu_check.py cannot rot: its CPU smoke mode runs here, and what it relies on on the GPU
machine (no installed bevctl, torchrun with one process) is checked on the CPU."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bevctl.train.checkpoint import load_checkpoint
from bevctl.train.config import TrainConfig
from bevctl.train.loop import RunSpec, train
from bevctl.train.toy import toy_dataset_factory

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
# the same code paths as the small ones (other YAMLs); subprocess start-up and dynamo tracing: the slow test
SLOW_STEPS = "torchrun,compile,gpu_tests,pretrain_base,finetune_base"


def _smoke(tmp_path: Path, *args: str, timeout: int = 900) -> tuple[subprocess.CompletedProcess, dict]:
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path / "out"), *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    path = tmp_path / "out" / "gpu.json"
    return proc, (json.loads(path.read_text()) if path.is_file() else {})


def _check_results(r: dict, skipped: set[str]) -> None:
    steps = r["steps"]
    assert r["mode"] == "smoke" and r["device"] == "cpu"
    assert r["ray_imported"] is False  # the GPU machine has no Ray
    for name, entry in steps.items():
        assert entry["status"].startswith("ok"), (name, entry)
    lab = steps["labeler_mask2former"]["result"]
    assert lab["labeler_device"] == "cpu" and lab["labeler_dtype"] == "float32"
    assert lab["images_labeled"] == 36 and lab["gflop_per_image"] > 0 and 0 < lab["model_busy"] <= 1
    assert lab["architecture"]["num_labels"] == 65
    for name in {"pretrain_small", "finetune_small", "pretrain_base", "finetune_base"} - skipped:
        run = steps[name]["result"]
        assert run["steps"] == 3 and all(math.isfinite(x) for x in run["losses"]), name
        assert run["gflop_per_step"] > 0 and 0 <= run["data_wait_fraction"] < 1
    assert steps["amp_vs_fp32"]["result"]["agree"]
    assert steps["evaluate_visualize"]["result"]["pictures"] > 0
    assert steps["profile"]["result"]["top"]
    if "torchrun" not in skipped:
        assert steps["torchrun"]["result"]["backend"] == "gloo" and steps["torchrun"]["result"]["agree"]
    if "compile" not in skipped:
        assert steps["compile"]["result"]["compiled_s_per_step"] > 0


def test_smoke_mode_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    proc, r = _smoke(tmp_path, "--skip", SLOW_STEPS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_results(r, set(SLOW_STEPS.split(",")))
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "Smoke mode" in md and "| labeler_mask2former | cpu, float32 |" in md


@pytest.mark.slow
def test_smoke_mode_with_torchrun_compile_and_pytest(tmp_path: Path) -> None:
    proc, r = _smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_results(r, set())
    assert "skipped" in r["steps"]["gpu_tests"]["result"]["summary"]  # no CUDA here


def test_budget_stops_the_run_and_keeps_partial_results(tmp_path: Path) -> None:
    """3 s cannot hold env (importing transformers) + synth + prepare-gt anywhere: the run stops
    itself on time, names what it cut, and still writes its results."""
    proc, r = _smoke(tmp_path, "--only", "synth,prepare_gt", "--budget-s", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r["wall_s"] <= 5  # from the start (after imports) to the last write; a signal waits for a C call to return
    statuses = [r["steps"][name]["status"] for name in ("env", "synth", "prepare_gt")]
    cut = ("stopped: wall-clock budget", "skipped: wall-clock budget")
    assert all(s == "ok" or s in cut for s in statuses) and statuses[-1] in cut, statuses
    assert "wall-clock budget" in (tmp_path / "out" / "gpu.md").read_text()


def test_label_store_reads_without_the_codec_entry_point(tiny_synth, tmp_path: Path) -> None:
    """On the GPU machine bevctl is not pip-installed, so zarr finds no ``bevctl_rle`` entry
    point: importing bevctl's storage must register the codec itself."""
    from bevctl.pseudolabel.job import PseudolabelConfig, run_pseudolabel
    from bevctl.storage.labels import open_mask_arrays

    root, version = tiny_synth
    out = tmp_path / "labels.zarr"
    run_pseudolabel(PseudolabelConfig(dataroot=str(root), version=version, out=str(out), model="synth-gt",
                                      workers=0, resolution=(45, 80), progress=False))
    want = int(open_mask_arrays(str(out), False)[0][:].astype("int64").sum())
    code = f"""
import importlib.metadata as md
real = md.entry_points
def without_bevctl(**kw):  # as if bevctl were not installed
    eps = real(**kw) if kw else [e for d in md.distributions() for e in d.entry_points]
    return md.EntryPoints(e for e in eps if e.name != "bevctl_rle")
md.entry_points = without_bevctl
import zarr.registry
assert "bevctl_rle" not in [e.name for e in md.entry_points(group="zarr.codecs")]
from bevctl.storage.labels import open_mask_arrays
print(int(open_mask_arrays({str(out)!r}, False)[0][:].astype("int64").sum()))
"""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) == want > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_torchrun_joins_a_group_and_equals_the_plain_run(tmp_path: Path, monkeypatch) -> None:
    """Under torchrun (WORLD_SIZE set) one process still forms a process group (gloo here, NCCL on
    a GPU) and trains through DDP; the result is bit-identical to the plain run."""
    cfg = TrainConfig(model="toy", grid="demo", image_hw=(32, 56), batch_size=2, epochs=3, max_steps=3, lr=3e-3,
                      warmup_steps=2, checkpoint_every=3, num_workers=0, seed=1)

    def spec(name: str) -> RunSpec:
        return RunSpec(mode="pretrain", cfg=cfg, run_dir=tmp_path / name, device="cpu", progress=False,
                       dataset_factory=toy_dataset_factory, extra={"n": 8})

    torch.set_num_threads(1)
    plain = train(spec("plain"))
    with monkeypatch.context() as m:
        for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())}.items():
            m.setenv(key, value)
        grouped = train(spec("torchrun"))
    assert not torch.distributed.is_initialized()  # torn down
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["backend"] is None
    assert json.loads((tmp_path / "torchrun" / "run.json").read_text())["backend"] == "gloo"
    a, b = load_checkpoint(plain)["model"], load_checkpoint(grouped)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
