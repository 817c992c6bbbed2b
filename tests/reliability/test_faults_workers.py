"""Worker processes that die: Ray labeler actors (repeatedly) and DataLoader workers.

- A labeler actor that keeps dying (``crash-every:<k>``: every k-th batch of a process kills it,
  so each restarted actor dies again): Ray restarts it, its batches are resubmitted, and the job
  finishes with every sample done once and the masks of an uninterrupted run.
- A DataLoader worker that dies (``os._exit`` in the worker, or SIGKILL from outside, as the
  OOM killer would): training stops with one error line that says how to resume; ``--resume``
  ends with the weights and metrics of an uninterrupted run. (No transparent retry: a worker
  that died of memory would die again, and the resume is exact anyway.)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from faultkit import (FaultWorld, assert_same_training, count_lines, run_and_signal, run_bevctl, store_files,
                      temp_leftovers)
from torch.utils.data import get_worker_info

from bevctl.errors import BevctlError
from bevctl.storage.labels import LabelStore
from bevctl.train.checkpoint import load_checkpoint
from bevctl.train.config import TrainConfig
from bevctl.train.loop import RunSpec, train
from bevctl.train.toy import ToyDataset, toy_dataset_factory

# ---- Ray actors ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_labeler_actors_dying_again_and_again(fault_world: FaultWorld, tmp_path: Path) -> None:
    w = fault_world
    ref, out, marker = tmp_path / "ref.zarr", tmp_path / "out.zarr", tmp_path / "crashes.log"
    run_bevctl(w.pseudolabel(ref, model="synth-gt"), w.env()).clean_exit()
    res = run_bevctl([*w.pseudolabel(out, workers=2, model="crash-every:3"), "--batch-size", "3"],
                     w.env(BEVCTL_FAULT_MARKER=str(marker)))
    res.clean_exit()
    crashes = marker.read_text().splitlines()
    assert len(crashes) >= 3, crashes  # several actor processes died, not just one
    assert "actor crash(es) recovered" in res.out
    store = LabelStore.open(out)
    assert store.counts() == {"todo": 0, "done": 8, "failed": 0}
    assert "8/8 done" in res.out and "48 labeled" in res.out
    a, b = store_files(ref), store_files(out)  # same masks, confidence, done record, tokens
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    assert not temp_leftovers(tmp_path)


# ---- DataLoader workers ------------------------------------------------------------------------


class _DyingToyDataset(ToyDataset):
    """The toy dataset whose worker process exits hard when it loads sample ``die_at`` (once:
    the marker file records that it happened)."""

    def __init__(self, base: ToyDataset, die_at: int, marker: str) -> None:
        self.__dict__.update(base.__dict__)
        self.die_at, self.marker = die_at, marker

    def __getitem__(self, i: int) -> dict:
        if i == self.die_at and get_worker_info() is not None and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"worker {os.getpid()} died loading sample {i}\n")
            os._exit(3)
        return super().__getitem__(i)


def _dying_factory(spec: RunSpec) -> ToyDataset:
    return _DyingToyDataset(toy_dataset_factory(spec), spec.extra["die_at"], spec.extra["marker"])


def test_dataloader_worker_dies_then_resume_is_exact(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = TrainConfig(model="toy", grid="demo", image_hw=(32, 56), batch_size=1, epochs=3, max_steps=8, lr=3e-3,
                      warmup_steps=2, checkpoint_every=2, num_workers=1, prefetch_factor=1, seed=5)
    extra = {"n": 6, "die_at": 4, "marker": str(tmp_path / "died")}

    def spec(run: Path, **kw) -> RunSpec:
        return RunSpec(mode="pretrain", cfg=cfg, run_dir=run, device="cpu", progress=False,
                       dataset_factory=kw.pop("factory", _dying_factory), extra=extra, **kw)

    train(spec(tmp_path / "ref", factory=toy_dataset_factory))
    with pytest.raises(BevctlError, match=r"a data loader worker process died \(DataLoader worker .*exited "
                                          r"unexpectedly.*\); (rerun with --resume|no checkpoint)") as err:
        train(spec(tmp_path / "run"))
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    assert (tmp_path / "died").is_file()
    step = load_checkpoint(tmp_path / "run" / "last.pt")["step"] if (tmp_path / "run" / "last.pt").exists() else 0
    assert step < 8
    train(spec(tmp_path / "run", resume=True))
    assert_same_training(tmp_path / "ref", tmp_path / "run")
    assert not temp_leftovers(tmp_path)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def _loader_worker(pid: int) -> int | None:
    """A DataLoader worker of the training process ``pid``: a forked child running the same
    command line (other children, e.g. torch's shared-memory manager, run other programs)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        for child in _children(pid):
            if Path(f"/proc/{child}/cmdline").read_bytes() == cmdline:
                return child
    except FileNotFoundError:
        return None
    return None


@pytest.mark.slow
def test_dataloader_worker_killed_from_outside(fault_world: FaultWorld, ref_labels: Path, ref_pretrain: Path,
                                               tmp_path: Path) -> None:
    """SIGKILL of the loader worker of a running ``bevctl pretrain`` (as the OOM killer would)."""
    w = fault_world
    out = tmp_path / "pretrain"
    killed: list[int] = []

    def kill_worker_after_step_3() -> bool:  # never "fires" the group signal: only kills the worker
        if killed or count_lines(out / "metrics.jsonl") < 3:
            return False
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if b"faultkit.py\0pretrain" in cmd and str(out).encode() in cmd:
                worker = _loader_worker(pid)
                if worker is not None:
                    os.kill(worker, signal.SIGKILL)
                    killed.append(worker)
                    break
        return False

    res = run_and_signal(w.pretrain(out, ref_labels), w.env(), signal.SIGKILL, kill_worker_after_step_3,
                         log_dir=tmp_path / "logs")
    assert killed, "no loader worker was found to kill"
    if res.code == 0:  # the worker had already loaded every remaining batch: nothing was lost
        pytest.skip("the run finished from prefetched batches before it noticed the dead worker")
    line = res.one_error_line("a data loader worker process died")
    # torch names the cause it noticed first: the signal, or (under load) just the worker's exit
    assert "killed by signal" in line or "exited unexpectedly" in line, line
    assert "--resume" in line or "no checkpoint" in line
    time.sleep(0.1)
    rerun = run_bevctl(w.pretrain(out, ref_labels, resume=True), w.env())
    rerun.clean_exit()
    assert_same_training(ref_pretrain, out)
    assert not temp_leftovers(tmp_path)


def test_loader_worker_hides_only_the_fd_sharer_threads_connection_noise() -> None:
    """multiprocessing's resource sharer thread reports through sys.excepthook: in a loader worker
    its EOFError/OSError (the interrupted main process left mid-handoff) is not printed; any
    other error, or the same error in another thread, still is. Run in a child process: the hook
    changes process-wide state."""
    import subprocess
    import sys

    code = """
import sys, threading
from bevctl.train.loop import loader_worker_init
loader_worker_init(0)
def report(exc):
    try:
        raise exc
    except BaseException:
        sys.excepthook(*sys.exc_info())
for name, exc in [("Thread-1 (_serve)", EOFError("sharer-eof")), ("Thread-2 (_serve)", ConnectionResetError("sharer-reset")),
                  ("Thread-3 (_serve)", ValueError("sharer-bug")), ("Thread-4 (other)", EOFError("other-eof"))]:
    t = threading.Thread(target=report, args=(exc,), name=name); t.start(); t.join()
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "sharer-eof" not in res.stderr and "sharer-reset" not in res.stderr
    assert "sharer-bug" in res.stderr and "other-eof" in res.stderr
