"""Disk full while writing a store chunk or a checkpoint: one clear error line naming what was
being written, a non-zero exit, nothing torn (no temp file, the store reopens, the previous
checkpoint loads), and a rerun after space is freed ends identical to an uninterrupted run.

Two ways to fill the disk:

- in process, always: zarr's chunk writer or ``torch.save`` raises ``OSError(ENOSPC)`` from
  the k-th write on (the disk stays full), through the real ``bevctl`` entry point;
- a real size-limited file system (slow): the output lives on a small tmpfs, filled up to
  a few pages by a ballast file; freeing space = deleting the ballast. Needs root (``mount``);
  the test is skipped with the reason when the mount fails.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from faultkit import FaultWorld, Outcome, assert_same_store, assert_same_training, run_bevctl, temp_leftovers

from bevctl.storage.base import SampleStore
from bevctl.train.checkpoint import load_checkpoint

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
TOY_TRAIN = ("--config", "toy", "--device", "cpu", "--workers", "0", "--batch-size", "1", "--epochs", "10",
             "--max-steps", "8", "--checkpoint-every", "2", "--seed", "0")


def _fill_disk_after(monkeypatch: pytest.MonkeyPatch, array: str, k: int) -> dict[str, int]:
    """Every zarr file write fails with ENOSPC once ``k`` chunks of ``array`` were written."""
    from zarr.storage import _local

    real = _local._put
    seen = {"chunks": 0, "refused": 0}

    def put(path: Path, value, exclusive: bool = False):
        if seen["chunks"] >= k:
            seen["refused"] += 1
            raise ENOSPC
        if f"/{array}/c/" in Path(path).as_posix():
            seen["chunks"] += 1
        return real(path, value, exclusive)

    monkeypatch.setattr(_local, "_put", put)
    return seen


@pytest.mark.parametrize("command", ["pseudolabel", "prepare-gt"])
def test_disk_full_writing_a_store_chunk(command: str, fault_world: FaultWorld, bevctl_cli, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if command == "pseudolabel":
        args, kind, array, n_chunks = (lambda out: fault_world.pseudolabel(out, model="synth-gt")), "pseudolabels", \
            "masks", 8  # one mask chunk per sample
    else:
        args, kind, array, n_chunks = fault_world.prepare_gt, "bev_gt", "bev", 8
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    assert bevctl_cli(*args(ref)).code == 0  # the uninterrupted run (same process, same settings)

    with monkeypatch.context() as m:
        seen = _fill_disk_after(m, array, n_chunks // 2)
        res = bevctl_cli(*args(out))
    assert seen["refused"] >= 1
    res.assert_refused("no space left on device", str(out), "rerun")
    store = SampleStore.open(out, kind)  # reopens: nothing torn
    assert store.counts()["done"] < store.counts()["todo"] + store.counts()["done"]
    assert not temp_leftovers(tmp_path), temp_leftovers(tmp_path)

    again = bevctl_cli(*args(out))  # space freed
    assert again.code == 0, again.text
    assert_same_store(ref, out)
    assert not temp_leftovers(tmp_path)


def test_disk_full_writing_a_checkpoint(fault_world: FaultWorld, bevctl_cli, ref_labels: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def pretrain(out: Path, *extra: str) -> list[str]:
        return ["pretrain", *fault_world.data(), "--labels", str(ref_labels), "--out", str(out), *TOY_TRAIN, *extra]

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert bevctl_cli(*pretrain(ref)).code == 0
    real_save = torch.save

    def save_until_full(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("step") == 6:  # half a checkpoint, then the disk is full
            f.write(b"\0" * 4096)
            raise ENOSPC
        return real_save(obj, f, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", save_until_full)
        res = bevctl_cli(*pretrain(run))
    res.assert_refused("no space left on device writing", str(run / "checkpoints" / "step_0000006.pt"))
    assert load_checkpoint(run / "last.pt")["step"] == 4  # the previous checkpoint still loads
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002.pt", "step_0000004.pt"]
    assert not temp_leftovers(tmp_path), temp_leftovers(tmp_path)

    again = bevctl_cli(*pretrain(run, "--resume"))
    assert again.code == 0, again.text
    assert_same_training(ref, run)


# ---- a real full file system (tmpfs) ----------------------------------------------------------------

PAGE = 4096


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {detail.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs at ``tmp_path/disk`` (room for a whole training run), unmounted afterwards."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "16m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True, timeout=30)


def _fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves about ``leave`` bytes free on ``disk``."""
    st = os.statvfs(disk)
    ballast = disk / "ballast"
    with ballast.open("wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


def _pages(root: Path) -> int:
    """Bytes ``root``'s files occupy on tmpfs (whole pages)."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("command", ["pseudolabel", "prepare-gt", "pretrain"])
def test_tmpfs_fills_up_then_space_is_freed(command: str, fault_world: FaultWorld, small_disk: Path,
                                            tmp_path: Path, request: pytest.FixtureRequest) -> None:
    w = fault_world
    if command == "pretrain":
        ref = request.getfixturevalue("ref_pretrain")
        labels = request.getfixturevalue("ref_labels")
        out = small_disk / "run"
        first, again = w.pretrain(out, labels), w.pretrain(out, labels, resume=True)
        leave = 2 * (ref / "last.pt").stat().st_size - 64 * 1024  # room for a checkpoint or two, not for all four
        named = str(out / "checkpoints" / "step_")
    else:
        ref = request.getfixturevalue("ref_labels" if command == "pseudolabel" else "ref_gt")
        out = small_disk / ref.name
        first = again = w.pseudolabel(out) if command == "pseudolabel" else w.prepare_gt(out)
        leave = _pages(ref) // 2  # half the store fits
        named = str(out)
    ballast = _fill(small_disk, leave)
    res: Outcome = run_bevctl(first, w.env())
    line = res.one_error_line("no space left on device writing", named)
    assert "rerun" in line
    if command == "pretrain":  # the checkpoint before the one that did not fit still loads
        failed_step = int(re.search(r"step_(\d+)\.pt", line).group(1))
        assert load_checkpoint(out / "last.pt")["step"] == failed_step - 2
    else:
        SampleStore.open(out, "pseudolabels" if command == "pseudolabel" else "bev_gt")
    assert not temp_leftovers(small_disk), temp_leftovers(small_disk)

    ballast.unlink()  # space freed
    rerun = run_bevctl(again, w.env())
    rerun.clean_exit()
    if command == "pretrain":
        assert_same_training(ref, out)
    else:
        assert_same_store(ref, out)
    assert not temp_leftovers(small_disk)
