"""``bevctl demo --quick`` killed three times (SIGKILL, SIGINT, SIGKILL) at phase boundaries and
inside a training phase, then rerun to the end: the same stores, checkpoints and report numbers
as an uninterrupted demo. Slow (two quick demos, ~5 min each on a busy 2-core machine); the
phases themselves are covered case by case in test_faults_kill.py."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from faultkit import Outcome, assert_same_store, assert_same_training, cli_env, run_and_signal, run_bevctl, temp_leftovers


def _phase_done(out: Path, name: str):
    def done() -> bool:
        try:
            return bool(json.loads((out / "phases.json").read_text()).get(name, {}).get("done"))
        except (FileNotFoundError, json.JSONDecodeError):
            return False
    return done


@pytest.mark.slow
def test_demo_killed_three_times_ends_like_an_uninterrupted_demo(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "cache")
    ref, out = tmp_path / "ref", tmp_path / "demo"

    def demo(where: Path) -> list[str]:
        return ["demo", "--quick", "--out", str(where), "--labeler", "synth-gt"]

    run_bevctl(demo(ref), env, timeout=1800).clean_exit()
    kills = [
        (signal.SIGKILL, _phase_done(out, "pseudolabel:synth-gt")),  # at the start of prepare-gt
        (signal.SIGINT, lambda: any((out / "runs" / "pretrain" / "checkpoints").glob("step_*.pt"))),  # in pretrain
        (signal.SIGKILL, _phase_done(out, "train:finetune50")),  # at the start of the baseline
    ]
    for sig, when in kills:
        res: Outcome = run_and_signal(demo(out), env, sig, when, timeout=1800, log_dir=tmp_path / "logs")
        if sig == signal.SIGINT:
            res.interrupted()
        else:
            res.killed()
    final = run_bevctl(demo(out), env, timeout=1800)
    final.clean_exit()

    assert_same_store(ref / "labels-synth-gt.zarr", out / "labels-synth-gt.zarr")
    assert_same_store(ref / "gt.zarr", out / "gt.zarr")
    for run in ("pretrain", "finetune50", "baseline100"):
        assert_same_training(ref / "runs" / run, out / "runs" / run)
    a, b = (json.loads((d / "report.json").read_text())["models"] for d in (ref, out))
    assert [(m["name"], m["miou"], m["iou_per_class"]) for m in a] == [(m["name"], m["miou"], m["iou_per_class"])
                                                                       for m in b]
    assert not temp_leftovers(tmp_path)
