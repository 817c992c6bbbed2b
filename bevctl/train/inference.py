"""The model over samples in scene order, with its temporal history: the one forward loop that
``evaluate``, ``predict`` and ``visualize`` share.

History rule (as in training): a model trained with the temporal loss gets, for each frame, the
previous frame's BEV features (``prev_bev``) and the ego motion between the two frames, but only
when the frame processed just before it is its previous keyframe in the same scene. A scene's
first frame, and any frame whose previous keyframe was not processed right before it (a scene
boundary, a gap in a chosen subset), runs without history, exactly like the first frame of a
scene in training. Models trained frame by frame never get history.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from bevctl.data.records import SampleRecord
from bevctl.train.config import TrainConfig
from bevctl.train.dataset import collate
from bevctl.train.loop import loader_worker_init
from bevctl.train.tasks import cur_T_prev, to_device


def uses_history(cfg: TrainConfig, run: dict[str, Any]) -> bool:
    """Pretraining runs with a temporal loss were trained with ``prev_bev`` (``run``: the
    checkpoint's run record); fine-tuned runs frame by frame."""
    return run.get("mode") == "pretrain" and cfg.temporal_weight > 0


def history_flags(samples: Sequence[SampleRecord], temporal: bool) -> list[bool]:
    """Per sample: does it get the previous frame's BEV (see the module docstring)?"""
    return [temporal and i > 0 and s.prev_token == samples[i - 1].token for i, s in enumerate(samples)]


@dataclass
class Forward:
    """One batch through the model: the CPU batch as the loader gave it, the logits
    ``(B, C, X, Y)`` (float32, on the model's device) and which samples had history."""

    batch: dict[str, Any]
    logits: torch.Tensor
    history: list[bool]


def make_loader(ds: Dataset, batch_size: int, num_workers: int, temporal: bool) -> DataLoader:
    """Frames in dataset order; a temporal model takes them one at a time (each needs its
    predecessor's BEV)."""
    return DataLoader(ds, batch_size=1 if temporal else batch_size, num_workers=num_workers, collate_fn=collate,
                      prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=loader_worker_init)


@torch.no_grad()
def forward_in_order(model: torch.nn.Module, loader: Iterable[dict[str, Any]], samples: Sequence[SampleRecord],
                     device: torch.device, temporal: bool) -> Iterator[Forward]:
    """Run ``model`` over ``loader`` (a DataLoader, or any iterable of collated batches) whose
    items are ``samples``, in this order, feeding
    history per :func:`history_flags`. Images go in as uint8 (the models normalise them).
    bfloat16 autocast on CUDA, float32 on CPU."""
    flags = history_flags(samples, temporal)
    prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (bev, global_T_ego) of the last frame
    i = 0
    for batch in loader:
        n = len(batch["token"])
        b = to_device(batch, device)
        kwargs: dict[str, Any] = {}
        if temporal and flags[i] and prev is not None:
            kwargs = {"prev_bev": prev[0], "cur_T_prev": cur_T_prev(b["global_T_ego"], prev[1])}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(b["images"], b["pix_T_cam"], b["ego_T_cam"], **kwargs)
        if temporal:
            prev = (out.bev, b["global_T_ego"])
        yield Forward(batch=batch, logits=out.logits.float(), history=flags[i:i + n])
        i += n
