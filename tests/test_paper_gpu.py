"""bench/paper.py's GPU plan: its model preset fits, and its code path runs end to end on the CPU
at toy size (``--rehearse toy``), stops at --time-budget with a partial table, and resumes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from bevctl.config import grid_from_name
from bevctl.demo import GPU, PLANS
from bevctl.train.config import load_train_config
from bevctl.train.model import BEVFormer, count_parameters, model_preset

ROOT = Path(__file__).resolve().parents[1]


def _paper_module():
    spec = importlib.util.spec_from_file_location("bench_paper", ROOT / "bench" / "paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_gpu_plan_model_preset_shapes() -> None:
    """The demo-gpu model builds and maps 6 cameras at its input size to the demo grid's logits."""
    plan = PLANS["gpu"]
    cfg = load_train_config(plan.train_config)
    mc = model_preset(cfg.model)
    assert tuple(mc.image_hw) == plan.image_hw  # the world's own images, no resize in the loader
    grid = grid_from_name(cfg.grid)
    with torch.device("meta"):  # shapes only: a CPU forward of this model takes seconds
        model = BEVFormer(mc, grid, 4)
        h, w = mc.image_hw
        out = model(torch.empty(2, 6, 3, h, w), torch.empty(2, 6, 3, 3), torch.empty(2, 6, 4, 4))
    assert tuple(out.logits.shape) == (2, 4, *grid.shape)
    params = count_parameters(model)["total"]
    demo = count_parameters(BEVFormer(model_preset("demo"), grid, 4))["total"]
    assert params > 10 * demo  # "a model well above the CPU plans'"


def test_gpu_plan_runtime_never_uses_ray() -> None:
    assert GPU.device == "cuda" and GPU.label_workers == 0  # the labeler in process: no Ray on the GPU machine


def test_gpu_plan_rehearsal_stops_at_budget_then_resumes(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("BEVCTL_CACHE_DIR", str(tmp_path / "cache"))
    had_ray = "ray" in sys.modules
    paper = _paper_module()
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["paper.py", "--plan", "gpu", "--rehearse", "toy", "--seeds", "1", "--fractions", "0.5,1.0",
            "--no-ablations", "--out", str(work), "--results", str(results)]
    stem = results / "paper-gpu-rehearsal-toy"

    # a zero budget: the data is prepared, then no run fits; the partial table says why
    monkeypatch.setattr(sys, "argv", [*argv, "--time-budget", "0"])
    assert paper.main() == 0
    partial = json.loads(stem.with_suffix(".json").read_text())
    assert partial["complete"] is False and partial["runs"] == []
    assert "--time-budget" in partial["stopped"] and "pretrain-s0" in partial["stopped"]
    assert "Partial results: stopped by --time-budget" in stem.with_suffix(".md").read_text()
    phases = json.loads((work / "phases.json").read_text())
    assert {"synth", "pseudolabel:synth-gt", "prepare-gt"} <= set(phases)
    assert not any(p.startswith("train:") for p in phases)
    capsys.readouterr()

    # without a budget the same command resumes (data phases skipped) and completes every arm
    monkeypatch.setattr(sys, "argv", argv)
    assert paper.main() == 0
    assert "== synth" not in capsys.readouterr().out  # done before: skipped
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["complete"] is True and result["stopped"] is None and result["rehearsal"] == "toy"
    rows = {t["name"]: t for t in result["rows"]}
    assert set(rows) == {"pretrain only", "pretrain + 50%", "scratch 50%", "pretrain + 100%", "scratch 100%"}
    assert all(0.0 <= t["miou_mean"] <= 1.0 and t["seeds"] == 1 for t in rows.values())
    # paired by seed: pretrain + 50% minus scratch 100% of the same seed
    runs = {r["name"]: r["miou"] for r in result["runs"]}
    assert rows["pretrain + 50%"]["delta_vs_scratch_100"][0] == pytest.approx(runs["pretrain + 50%"] - runs["scratch 100%"])
    assert rows["pretrain + 50%"]["wall_seconds_per_phase"]["pretrain"] > 0  # the pretraining's time counts
    plan = result["plan"]
    assert plan["pretrain_steps"] + plan["finetune_steps"] <= plan["baseline_steps"] / 2
    md = stem.with_suffix(".md").read_text()
    assert "Rehearsal at a reduced size (toy)" in md and "| scratch 100% | 100% | none | 1 |" in md
    assert had_ray or "ray" not in sys.modules  # the labeler ran in this process
