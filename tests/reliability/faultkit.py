"""Fault injection for the reliability suite: run a ``bevctl`` command as a subprocess, kill it
with a signal at a chosen point, and compare what it leaves with an uninterrupted run.

Also runnable as the ``bevctl`` entry point itself (``python faultkit.py <bevctl args>``): it
calls :func:`bevctl.cli.main` after applying the test-only slow-downs named by environment
variables, so a short job can be interrupted in the middle:

``BEVCTL_TEST_GT_SAMPLE_DELAY=<s>``  prepare-gt sleeps ``s`` seconds before each sample (in
                                     process, ``--workers 0``).

Kill points are drawn with a seeded RNG over the job's progress (:func:`kill_points`), e.g.
"after the 17th mask chunk file exists" or "after metrics line 5"; the same seed, the same
points. Only the standard library is imported at module level (the wrapper starts fast).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FAULTKIT = Path(__file__).resolve()
SIGINT_MESSAGE = "interrupted: rerun the same command to resume"
# metrics.jsonl fields that measure time, not the trajectory
TIMING_KEYS = ("t_data", "t_fwd", "t_loss", "t_bwd", "t_opt", "t_step", "samples_per_s", "max_mem_gb")


def bevctl_cmd(*args: object) -> list[str]:
    """The command line of ``bevctl <args>`` through this wrapper (same interpreter)."""
    return [sys.executable, str(FAULTKIT), *(str(a) for a in args)]


def cli_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a bevctl subprocess: offline, one thread, its own index cache."""
    env = {**os.environ, "BEVCTL_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "MPLCONFIGDIR": "/tmp/bevctl-mpl"}
    env.update(extra)
    return env


@dataclass
class Outcome:
    """How a bevctl subprocess ended. ``fired``: the signal was sent (the job had not ended)."""

    code: int
    out: str
    err: str
    fired: bool = False
    seconds: float = 0.0

    def clean_exit(self) -> None:
        assert self.code == 0, f"exit {self.code}\nstdout:\n{self.out[-3000:]}\nstderr:\n{self.err[-3000:]}"

    def interrupted(self) -> None:
        """Ctrl-C: exit 130, the resume hint, no traceback."""
        assert self.fired, "the job finished before the signal"
        assert self.code == 130, f"exit {self.code}, expected 130\nstderr:\n{self.err[-3000:]}"
        assert SIGINT_MESSAGE in self.err, self.err[-3000:]
        assert "Traceback" not in self.err, self.err[-3000:]

    def killed(self) -> None:
        assert self.fired, "the job finished before the signal"
        assert self.code == -signal.SIGKILL, f"exit {self.code}, expected -9\nstderr:\n{self.err[-3000:]}"

    def one_error_line(self, *needles: str) -> str:
        """Exit != 0, exactly one ``error:`` line naming every needle, no traceback."""
        assert self.code not in (0, -signal.SIGKILL), f"exit {self.code}\n{self.err[-3000:]}"
        lines = [ln for ln in self.err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, f"expected one error line, got {lines}\nstderr:\n{self.err[-3000:]}"
        assert "Traceback" not in self.err, self.err[-3000:]
        for needle in needles:
            assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
        return lines[0]


def run_bevctl(args: list[str], env: dict[str, str], timeout: float = 600) -> Outcome:
    start = time.monotonic()
    proc = subprocess.run(bevctl_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, seconds=time.monotonic() - start)


def run_and_signal(args: list[str], env: dict[str, str], sig: int, when: Callable[[], bool],
                   timeout: float = 600, poll_s: float = 0.02, log_dir: Path | None = None) -> Outcome:
    """Start ``bevctl <args>`` in its own process group; as soon as ``when()`` is true send ``sig``
    to the whole group (Ctrl-C in a terminal, or a node going down for SIGKILL) and wait.

    Whatever the group left running afterwards (Ray daemons, loader workers) is SIGKILLed, so
    a test never leaks processes. stdout/stderr go to files (no pipe can fill and block)."""
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    out_path, err_path = log_dir / f"bevctl-{tag}.out", log_dir / f"bevctl-{tag}.err"
    start = time.monotonic()
    fired = False
    with out_path.open("w") as out_f, err_path.open("w") as err_f:
        # SIGINT as in a terminal's foreground job, even when pytest itself runs in the background
        # (a background job inherits SIGINT ignored, and Python then keeps ignoring it)
        proc = subprocess.Popen(bevctl_cmd(*args), env=env, stdout=out_f, stderr=err_f, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            while proc.poll() is None and time.monotonic() - start < timeout:
                if when():
                    os.killpg(proc.pid, sig)
                    fired = True
                    break
                time.sleep(poll_s)
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reap_group(proc.pid)
    out, err = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    return Outcome(proc.returncode, out, err, fired=fired, seconds=time.monotonic() - start)


def reap_group(pgid: int) -> None:
    """SIGKILL what is left of a process group this module started (and only that group)."""
    for _ in range(50):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def kill_points(seed: int, low: int, high: int, n: int) -> list[int]:
    """``n`` distinct progress counts in ``[low, high]``, drawn with ``seed`` (sorted)."""
    return sorted(random.Random(seed).sample(range(low, high + 1), n))


# ---- progress probes (the ``when`` of run_and_signal) -------------------------------------------


def count_chunk_files(array_dir: Path) -> int:
    """Chunk files an array has written so far (zarr's in-flight ``*.partial`` excluded)."""
    chunks = array_dir / "c"
    if not chunks.is_dir():
        return 0
    return sum(1 for p in chunks.rglob("*") if p.is_file() and not p.name.endswith(".partial"))


def count_lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def at_least(probe: Callable[[], int], n: int) -> Callable[[], bool]:
    return lambda: probe() >= n


# ---- what a run leaves behind -------------------------------------------------------------------


def is_temp_name(name: str) -> bool:
    """Temp names of bevctl (io.py, storage/base.py, train/*: ``.<name>.<x>.tmp``, ``.<name>.tmp-<x>``,
    ``.<name>.old-<x>``) and of zarr's LocalStore (``<chunk>.<uuid>.partial``)."""
    return (name.startswith(".") and (".tmp" in name or ".old-" in name)) or name.endswith(".partial")


def temp_leftovers(root: Path) -> list[Path]:
    """Every temp file or directory under ``root`` (a torn write or an unfinished rename)."""
    return sorted(p for p in Path(root).rglob("*") if is_temp_name(p.name))


def plant_torn_write(kind: str, directory: Path) -> Path:
    """Leave what a writer killed in the middle of a write leaves in ``directory``: half a zarr
    chunk in its temp file (``kind="chunk"``: beside the first chunk file below ``directory``)
    or half a checkpoint in bevctl's temp file (``kind="checkpoint"``)."""
    import uuid

    if kind == "chunk":
        chunk = next(p for p in sorted(Path(directory).rglob("*")) if p.is_file() and not is_temp_name(p.name))
        torn = chunk.with_name(f"{chunk.name}.{uuid.uuid4().hex}.partial")
        torn.write_bytes(chunk.read_bytes()[: max(1, chunk.stat().st_size // 2)])
    else:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torn = Path(directory) / f".step_9999999.pt.{uuid.uuid4().hex[:8]}.tmp"
        torn.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    return torn


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a Zarr store by relative path, except the group's own ``zarr.json`` (its
    attributes carry run timestamps and summaries, which differ between runs by design)."""
    store = Path(store)
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p != store / "zarr.json"}


def assert_same_store(ref: Path, got: Path) -> None:
    """Bit-identical arrays: the same chunk files (data, ``done``, ``tokens``) with the same bytes,
    and the same store metadata (``bevctl.metadata`` of the group attributes)."""
    a, b = store_files(ref), store_files(got)
    assert sorted(a) == sorted(b), f"files differ: only in ref {sorted(set(a) - set(b))[:5]}, " \
                                   f"only in got {sorted(set(b) - set(a))[:5]}"
    differing = [k for k in a if a[k] != b[k]]
    assert not differing, f"{len(differing)} files differ, e.g. {differing[:5]}"
    meta = [json.loads((p / "zarr.json").read_text())["attributes"]["bevctl"]["metadata"] for p in (ref, got)]
    assert meta[0] == meta[1]


def metrics_rows(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields: the training trajectory."""
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_training(ref: Path, got: Path) -> None:
    """The final checkpoint (weights, optimiser, scheduler, step) and the per-step metrics of
    ``got`` equal those of the uninterrupted run ``ref`` exactly."""
    import torch

    from bevctl.train.checkpoint import load_checkpoint

    a, b = load_checkpoint(Path(ref) / "last.pt"), load_checkpoint(Path(got) / "last.pt")
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    diff = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not diff, f"weights differ from the uninterrupted run: {diff[:5]}"
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(torch.as_tensor(group_a[k]), torch.as_tensor(group_b[k])) for k in group_a)
    assert a["scheduler"] == b["scheduler"]
    rows_a, rows_b = metrics_rows(ref), metrics_rows(got)
    assert [r["step"] for r in rows_b] == list(range(1, a["step"] + 1)), "metrics lost or duplicated steps"
    assert rows_a == rows_b


# ---- the commands under test, with the options every run of one case shares ----------------------

PSEUDOLABEL_MODEL = "synth-gt:0.05"  # the synthetic world's image GT, 0.05 s per batch (killable)
TRAIN_OPTIONS = ("--config", "demo", "--device", "cpu", "--workers", "1", "--batch-size", "1",
                 "--epochs", "10", "--max-steps", "8", "--checkpoint-every", "2", "--seed", "0")
TRAIN_STEPS = 8


@dataclass(frozen=True)
class FaultWorld:
    """The tiny synthetic dataset and the options of each command as the suite runs them."""

    root: Path
    version: str
    cache: Path  # BEVCTL_CACHE_DIR of every subprocess

    def env(self, **extra: str) -> dict[str, str]:
        return cli_env(self.cache, **extra)

    def data(self) -> list[str]:
        return ["--dataroot", str(self.root), "--version", self.version]

    def pseudolabel(self, out: Path, workers: int = 0, model: str = PSEUDOLABEL_MODEL) -> list[str]:
        return ["pseudolabel", *self.data(), "--out", str(out), "--model", model, "--workers", str(workers),
                "--batch-size", "2", "--resolution", "45x80", "--confidence"]

    def prepare_gt(self, out: Path, workers: int = 0) -> list[str]:
        return ["prepare-gt", *self.data(), "--grid", "demo", "--classes", "hdmapnet", "--out", str(out),
                "--workers", str(workers)]

    def pretrain(self, out: Path, labels: Path, resume: bool = False) -> list[str]:
        return ["pretrain", *self.data(), "--labels", str(labels), "--out", str(out), *TRAIN_OPTIONS,
                *(["--resume"] if resume else [])]

    def finetune(self, out: Path, gt: Path, init: Path, resume: bool = False) -> list[str]:
        return ["finetune", *self.data(), "--gt", str(gt), "--init", str(init), "--fraction", "1.0",
                "--out", str(out), *TRAIN_OPTIONS, *(["--resume"] if resume else [])]


# ---- the wrapper entry point ----------------------------------------------------------------------


def _slow_down_prepare_gt(delay: float) -> None:
    from bevctl.storage import gt_store

    real = gt_store._run_task

    def per_sample(items):
        results = []
        for item in items:
            time.sleep(delay)
            results += real([item])
        return results

    gt_store._run_task = per_sample


def _main() -> None:
    delay = os.environ.get("BEVCTL_TEST_GT_SAMPLE_DELAY")
    if delay:
        _slow_down_prepare_gt(float(delay))
    from bevctl.cli import main

    sys.argv = ["bevctl", *sys.argv[1:]]
    main()


if __name__ == "__main__":
    _main()
