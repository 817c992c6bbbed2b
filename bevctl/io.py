"""Atomic file writes: a temp file in the same directory, fsync, then ``os.replace``.

A crash or Ctrl-C leaves either the old file or the new one, never a torn one, and no
temp file with a name a reader would pick up (temp names start with ``.`` and end in ``.tmp``).
A full disk (or quota) is one :class:`~bevctl.errors.BevctlError` line naming the file
(:func:`disk_full_error`); the file keeps its previous content.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from bevctl.errors import BevctlError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _in_chain(error: BaseException | None, test: Callable[[BaseException], bool]) -> bool:
    """``test`` holds for ``error`` or an exception it was raised from or while handling.
    (torch.save reports an exception of its ``write`` callback, e.g. an OSError or a Ctrl-C, as a
    RuntimeError raised while handling it.)"""
    for _ in range(8):
        if error is None:
            return False
        if test(error):
            return True
        error = error.__cause__ if error.__suppress_context__ else (error.__cause__ or error.__context__)
    return False


def is_disk_full(error: BaseException | None) -> bool:
    """``error`` (or one in its chain) is an OSError saying the device or the quota is full."""
    return _in_chain(error, lambda e: isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)


def disk_full_error(path: str | Path | None) -> BevctlError:
    """The one line for a write that failed on a full disk (``path``: what was being written)."""
    where = f" writing {path}" if path else ""
    return BevctlError(f"no space left on device{where}; free some space and rerun the same command: it resumes")


# what a writer killed mid-write leaves: our temp files (``.<name>.<x>.tmp``) and zarr's
# LocalStore chunk temp files (``<chunk>.<32 hex>.partial``)
_STALE_TEMP = re.compile(r"^\..+\.tmp$|\.[0-9a-f]{32}\.partial$")


def remove_stale_temp_files(directory: str | Path, recursive: bool = False) -> int:
    """Delete the temp files a killed writer left in ``directory`` (and below, if ``recursive``);
    returns how many. Only the one process that writes there may call this (a resuming job)."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for p in directory.rglob("*") if recursive else directory.iterdir():
        if _STALE_TEMP.search(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temp file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if is_disk_full(e):
            raise disk_full_error(path) from None
        if not isinstance(e, KeyboardInterrupt) and _in_chain(e, lambda x: isinstance(x, KeyboardInterrupt)):
            raise KeyboardInterrupt from None  # Ctrl-C in the middle of torch.save: still a Ctrl-C
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
