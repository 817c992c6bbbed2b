"""What one training step computes, per mode: ``task(model, batch) -> (loss, stats)``.

A batch is the collated output of :class:`bevctl.train.dataset.TrainDataset` (or the toy
dataset): ``images (B, N, 3, H, W)`` uint8 (or float), ``pix_T_cam (B, N, 3, 3)`` for the
model's input size, ``ego_T_cam (B, N, 4, 4)``, ``global_T_ego (B, 4, 4)``, ``labels
(B, N, h, w)`` (BEV ids, 255 ignore), optional ``confidence``, ``bev_gt (B, X, Y)``, and for
temporal training ``has_prev (B,)`` + ``prev_*`` copies of the camera fields. With adjacent
keyframes' labels, ``labels (B, N * F, h, w)`` and ``label_pix_T_cam``,
``label_calib_ego_T_cam``, ``label_sample_T_camego`` for those N * F label cameras.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from bevctl import geometry
from bevctl.config import BEVGrid
from bevctl.train import losses
from bevctl.train.config import TrainConfig

def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def cur_T_prev(global_T_cur: torch.Tensor, global_T_prev: torch.Tensor) -> torch.Tensor:
    """``(B, 4, 4)`` transform from the previous ego frame into the current one."""
    return (geometry.invert_transform(global_T_cur.double()) @ global_T_prev.double()).float()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PretrainTask:
    """Reprojection loss vs image pseudo-labels (+ temporal loss vs the previous frame)."""

    def __init__(self, cfg: TrainConfig, grid: BEVGrid, num_classes: int, profile: bool = False) -> None:
        self.cfg, self.grid, self.c, self.profile = cfg, grid, num_classes, profile
        self.rays = losses.RayGridCache(grid)
        self.class_weights = torch.tensor(cfg.class_weights) if cfg.class_weights else None
        self.use_prev = cfg.temporal_weight > 0

    def __call__(self, model: nn.Module, batch: dict[str, Any], device: torch.device):
        t0 = time.perf_counter()
        images = batch["images"]  # uint8: the model normalises them
        prev_out = None
        kwargs: dict[str, Any] = {}
        if self.use_prev and "prev_images" in batch:
            with torch.no_grad():
                prev_out = model(batch["prev_images"], batch["prev_pix_T_cam"],
                                 batch["prev_ego_T_cam"])
            kwargs = {"prev_bev": prev_out.bev.detach(),
                      "cur_T_prev": cur_T_prev(batch["global_T_ego"], batch["prev_global_T_ego"])}
        out = model(images, batch["pix_T_cam"], batch["ego_T_cam"], **kwargs)
        if self.profile:
            _sync(device)
        t1 = time.perf_counter()
        labels = batch["labels"]
        image_hw = tuple(batch["images"].shape[-2:])
        if "label_pix_T_cam" in batch:  # the labels' cameras include adjacent keyframes'
            rays = self.rays.batch(batch["label_pix_T_cam"], batch["label_calib_ego_T_cam"], tuple(labels.shape[-2:]),
                                   image_hw, sample_T_camego=batch["label_sample_T_camego"])
        elif "calib_ego_T_cam" in batch:  # cache on the static calibration, then move by ego motion
            rays = self.rays.batch(batch["pix_T_cam"], batch["calib_ego_T_cam"], tuple(labels.shape[-2:]), image_hw,
                                   sample_T_camego=batch["sample_T_camego"])
        else:
            rays = self.rays.batch(batch["pix_T_cam"], batch["ego_T_cam"], tuple(labels.shape[-2:]), image_hw)
        cw = self.class_weights.to(device) if self.class_weights is not None else None
        l_rep, st = losses.reprojection_loss(
            out.logits, labels, rays, self.grid, confidence=batch.get("confidence"),
            min_confidence=self.cfg.min_confidence, class_weights=cw)
        loss = self.cfg.reproj_weight * l_rep
        stats = {"reproj": float(l_rep.detach()), **st}
        if prev_out is not None:
            l_tmp, st_t = losses.temporal_loss(
                out.logits, prev_out.logits, batch["global_T_ego"], batch["prev_global_T_ego"], self.grid,
                has_prev=batch["has_prev"].bool(), detach_prev=self.cfg.detach_prev)
            loss = loss + self.cfg.temporal_weight * l_tmp
            stats.update({"temporal": float(l_tmp.detach()), **st_t})
        stats.update(losses.prediction_stats(out.logits))
        if self.profile:
            _sync(device)
        stats.update({"t_fwd": t1 - t0, "t_loss": time.perf_counter() - t1})
        return loss, stats


class FinetuneTask:
    """Supervised BEV loss (CE + optional Dice) vs BEV ground truth."""

    def __init__(self, cfg: TrainConfig, grid: BEVGrid, num_classes: int, profile: bool = False) -> None:
        self.cfg, self.grid, self.c, self.profile = cfg, grid, num_classes, profile
        self.class_weights = torch.tensor(cfg.class_weights) if cfg.class_weights else None

    def __call__(self, model: nn.Module, batch: dict[str, Any], device: torch.device):
        t0 = time.perf_counter()
        out = model(batch["images"], batch["pix_T_cam"], batch["ego_T_cam"])
        if self.profile:
            _sync(device)
        t1 = time.perf_counter()
        cw = self.class_weights.to(device) if self.class_weights is not None else None
        loss, st = losses.supervised_loss(out.logits, batch["bev_gt"], class_weights=cw,
                                          dice_weight=self.cfg.dice_weight)
        stats = {**st, **losses.prediction_stats(out.logits)}
        if self.profile:
            _sync(device)
        stats.update({"t_fwd": t1 - t0, "t_loss": time.perf_counter() - t1})
        return loss, stats


def make_task(mode: str, cfg: TrainConfig, grid: BEVGrid, num_classes: int, profile: bool = False):
    if mode == "pretrain":
        return PretrainTask(cfg, grid, num_classes, profile)
    if mode == "finetune":
        return FinetuneTask(cfg, grid, num_classes, profile)
    raise ValueError(f"unknown training mode {mode!r}")
