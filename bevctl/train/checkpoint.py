"""Atomic checkpoints: ``RUN/checkpoints/step_NNNNNNN.pt`` plus ``RUN/last.pt`` (locally a hard
link to the newest, or a copy where links are impossible; on object storage a server-side copy).
``RUN`` is a local path or a URL (:mod:`bevctl.storage.location`): each file is written whole
(temp file + rename, or one PUT). Everything is saved as tensors and plain Python types so
:func:`load_checkpoint` works with ``weights_only=True``."""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bevctl.errors import BevctlError
from bevctl.storage import location


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int = 3) -> str:
    """Write ``payload`` atomically as the step checkpoint, point ``last.pt`` at it, prune old ones."""
    ckpt_dir = location.join(run_dir, "checkpoints")
    path = location.join(ckpt_dir, f"step_{step:07d}.pt")
    location.write_atomic(path, lambda f: torch.save(payload, f))
    location.copy_file(path, location.join(run_dir, "last.pt"))
    if keep > 0:
        steps = [n for n in location.listdir(ckpt_dir) if n.startswith("step_") and n.endswith(".pt")]
        for old in sorted(steps)[:-keep]:
            location.remove(location.join(ckpt_dir, old))
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a bevctl checkpoint (a file, or a run directory: its ``last.pt``; a local path or a
    URL) safely (``weights_only=True``); one error line if it is not one."""
    path = str(path)
    if location.is_dir(path):
        path = location.join(path, "last.pt")
    local = location.local_path(path)
    if not location.is_file(path):
        raise BevctlError(f"checkpoint not found: {path}")
    source = local if local is not None else io.BytesIO(location.read_bytes(path))
    try:
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, unsafe pickle
        raise BevctlError(f"{path}: not a readable bevctl checkpoint ({_why_unreadable(e)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise BevctlError(f"{path}: not a bevctl checkpoint (no model/config)")
    return ckpt


def _why_unreadable(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words. Never torch's own advice to
    retry with ``weights_only=False``: that runs arbitrary code from the file, and a bevctl
    checkpoint never needs it."""
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return ("not a torch file of tensors and plain values; bevctl loads checkpoints safely and "
                "refuses any other Python object")
    if "zip archive" in str(e) or isinstance(e, EOFError):
        return "truncated or not a torch file"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:160]}"
