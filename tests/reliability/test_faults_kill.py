"""SIGKILL and SIGINT at seeded points of every long-running command, then a rerun, compared with
an uninterrupted run of the same command (conftest ``ref_*``).

A case = (command, signal, kill point). The kill points are progress counts drawn with a seeded
RNG (:func:`faultkit.kill_points`): the number of mask chunks written (pseudolabel in process and
with a Ray actor), BEV chunks
written (prepare-gt), or metric lines logged (pretrain, finetune; a point between two checkpoints
makes the resumed run redo steps). The signal goes to the command's whole process group: SIGINT
is Ctrl-C in a terminal, SIGKILL a node or an OOM killer taking the job down.

Every case checks: the signal outcome (SIGINT: exit 130 + the resume hint, no traceback;
SIGKILL: dead), the partial state (the store reopens with fewer samples done / ``last.pt`` loads),
then plants the temp file of a write torn by the kill (half a chunk / half a checkpoint: what a
SIGKILL in the middle of a write leaves; a random kill point hits one only sometimes), checks
that the rerun completes, that its output is bit-identical to the uninterrupted run (store chunk
files incl. ``done``; final weights, optimiser state and per-step metrics) and that no temp file
is left anywhere. The first point of some cases runs in ``make test``; the rest are slow.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faultkit import (TRAIN_STEPS, FaultWorld, Outcome, assert_same_store, assert_same_training, at_least,
                      bevctl_cmd, count_chunk_files, count_lines, kill_points, plant_torn_write, run_and_signal,
                      run_bevctl, temp_leftovers)

from bevctl.storage.base import SampleStore
from bevctl.storage.labels import LabelStore
from bevctl.train.checkpoint import load_checkpoint

N_SAMPLES = 8  # tiny_synth: 2 scenes x 4 keyframes (train split: 4)
GT_DELAY = {"BEVCTL_TEST_GT_SAMPLE_DELAY": "0.2"}  # prepare-gt: ~1.6 s of work to interrupt

# (command, progress range of the kill points, seed): three points each
POINTS = {
    "pseudolabel": kill_points(61, 1, N_SAMPLES - 2, 3),  # mask chunks = samples written
    "pseudolabel-ray": kill_points(65, 1, N_SAMPLES - 2, 2),  # --workers 1: a Ray actor
    "prepare-gt": kill_points(62, 1, N_SAMPLES - 1, 3),
    "pretrain": kill_points(63, 1, TRAIN_STEPS - 1, 3),
    "finetune": kill_points(64, 1, TRAIN_STEPS - 1, 3),
}
# the cases that run in `make test` (the rest are @slow; training resumes are also checked in
# process, fast, by test_faults_disk.py and test_faults_workers.py)
FAST = {("pseudolabel", "SIGINT", 0), ("prepare-gt", "SIGKILL", 0)}


def _cases() -> list:
    cases = []
    for command, points in POINTS.items():
        for sig in ("SIGKILL", "SIGINT"):
            for k, point in enumerate(points):
                marks = () if (command, sig, k) in FAST else (pytest.mark.slow,)
                cases.append(pytest.param(command, sig, point, id=f"{command}-{sig}-at{point}", marks=marks))
    return cases


def _check_signal(res: Outcome, sig: str) -> None:
    if sig == "SIGINT":
        res.interrupted()
    else:
        res.killed()


@pytest.mark.parametrize("command,sig,point", _cases())
def test_kill_and_rerun_matches_uninterrupted_run(command: str, sig: str, point: int, fault_world: FaultWorld,
                                                  tmp_path: Path, request: pytest.FixtureRequest) -> None:
    w = fault_world
    signum = getattr(signal, sig)
    if command.startswith("pseudolabel"):
        ref = request.getfixturevalue("ref_labels")  # made in process (--workers 0): same bytes
        out = tmp_path / "labels.zarr"
        args, env = w.pseudolabel(out, workers=1 if command == "pseudolabel-ray" else 0), w.env()
        res = run_and_signal(args, env, signum, at_least(lambda: count_chunk_files(out / "masks"), point),
                             log_dir=tmp_path / "logs")
        _check_signal(res, sig)
        counts = LabelStore.open(out).counts()  # the store reopens; the job was cut short
        assert counts["done"] < N_SAMPLES and counts["failed"] == 0
        plant_torn_write("chunk", out / "masks")
        rerun = run_bevctl(args, env)
        rerun.clean_exit()
        assert f"{counts['done']} skipped (already done)" in rerun.out
        assert_same_store(ref, out)
    elif command == "prepare-gt":
        ref = request.getfixturevalue("ref_gt")
        out = tmp_path / "gt.zarr"
        args, env = w.prepare_gt(out), w.env(**GT_DELAY)
        res = run_and_signal(args, env, signum, at_least(lambda: count_chunk_files(out / "bev"), point),
                             log_dir=tmp_path / "logs")
        _check_signal(res, sig)
        done = SampleStore.open(out, "bev_gt").counts()["done"]
        assert done < N_SAMPLES
        plant_torn_write("chunk", out / "bev")
        rerun = run_bevctl(args, env)
        rerun.clean_exit()
        assert f"{done} already done, {N_SAMPLES - done} rasterised now, 0 failed" in rerun.out
        assert_same_store(ref, out)
    else:
        if command == "pretrain":
            ref = request.getfixturevalue("ref_pretrain")
            labels = request.getfixturevalue("ref_labels")
            out = tmp_path / "pretrain"
            first, again = w.pretrain(out, labels), w.pretrain(out, labels, resume=True)
        else:
            ref = request.getfixturevalue("ref_finetune")
            gt, init = request.getfixturevalue("ref_gt"), request.getfixturevalue("ref_pretrain") / "last.pt"
            out = tmp_path / "finetune"
            first, again = w.finetune(out, gt, init), w.finetune(out, gt, init, resume=True)
        res = run_and_signal(first, w.env(), signum, at_least(lambda: count_lines(out / "metrics.jsonl"), point),
                             log_dir=tmp_path / "logs")
        _check_signal(res, sig)
        logged = count_lines(out / "metrics.jsonl")
        assert point <= logged < TRAIN_STEPS
        if (out / "last.pt").exists():  # the last checkpoint loads: the resume starts from there
            assert load_checkpoint(out / "last.pt")["step"] in range(2, logged + 1, 2)
        plant_torn_write("checkpoint", out / "checkpoints")
        rerun = run_bevctl(again, w.env())
        rerun.clean_exit()
        assert_same_training(ref, out)
    assert not temp_leftovers(tmp_path), temp_leftovers(tmp_path)


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root`` (from /proc)."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            procs[int(name)] = (int(fields[1]), int(fields[19]))
    found, frontier = {}, {root}
    while frontier:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in frontier and pid not in found}
        found.update({pid: procs[pid][1] for pid in children})
        frontier = children
    return found


def _alive(seen: dict[int, int]) -> list[int]:
    alive = []
    for pid, start in seen.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state, ppid, ...
        if int(fields[19]) == start and fields[0] != "Z":  # a zombie is dead (its parent has not reaped it)
            alive.append(pid)
    return alive


@pytest.mark.slow
def test_sigkill_of_the_driver_alone_leaves_no_ray_process(fault_world: FaultWorld, tmp_path: Path) -> None:
    """SIGKILL to the pseudolabel driver only (not its process group, as the OOM killer does):
    every process it started (Ray's gcs_server, raylet, agents, the labeler actor) is gone
    within 30 s. RAY_AUTH_MODE is left as the caller's environment has it."""
    import tempfile

    w = fault_world
    out = tmp_path / "labels.zarr"
    env = w.env()
    env.pop("RAY_AUTH_MODE", None)  # the job decides (issue 18 turns token auth on)
    if "RAY_AUTH_MODE" in os.environ:
        env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
    short_tmp = tempfile.mkdtemp(prefix="bk", dir="/tmp")  # Ray's unix sockets need a short path
    env["TMPDIR"] = short_tmp
    seen: dict[int, int] = {}
    proc = subprocess.Popen(bevctl_cmd(*w.pseudolabel(out, workers=1, model="synth-gt:0.5")), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and count_chunk_files(out / "masks") < 2:
            seen.update(_descendants(proc.pid))
            time.sleep(0.1)
        seen.update(_descendants(proc.pid))
        assert proc.poll() is None, "the job ended before the kill"
        started = len(seen)
        assert started >= 4, f"expected Ray's processes under the driver, saw {started}"
        proc.send_signal(signal.SIGKILL)  # the driver only
        proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(seen):
            time.sleep(0.5)
        left = _alive(seen)
        assert not left, f"{len(left)} of the {started} processes the job started outlived the driver: " + ", ".join(
            Path(f"/proc/{p}/cmdline").read_text(errors="replace").replace("\0", " ")[:80] for p in left)
    finally:
        for pid in _alive(seen):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(short_tmp, ignore_errors=True)
