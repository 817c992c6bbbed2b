"""BEV segmentation metrics: per-class IoU and mIoU on a split.

Rules (also written into every result):

- prediction = argmax over all output channels (background included), per BEV cell;
- every cell of the grid counts, for every sample of the split that has ground truth; cells
  whose GT is 255 (ignore) would be skipped (the GT rasteriser writes none);
- IoU_k = TP_k / (TP_k + FP_k + FN_k), with the counts summed over all cells of all samples
  (dataset-level, not a mean of per-sample IoUs);
- mIoU = mean of IoU over the BEV classes, background excluded (its IoU is reported apart);
  a class absent from both GT and prediction has IoU null and is left out of the mean.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bevctl.config import class_set_from_name, dataclass_from_dict, grid_from_name
from bevctl.errors import BevctlError
from bevctl.train.checkpoint import load_checkpoint
from bevctl.train.config import TrainConfig

RULES = ("argmax over all channels incl. background; every grid cell of every sample with GT counts "
         "(GT 255 = ignore); IoU = TP/(TP+FP+FN) summed over the split; mIoU = mean over BEV classes "
         "without background; classes absent from GT and prediction are null and excluded")


def load_trained_model(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """(model in eval mode on ``device``, its TrainConfig, the checkpoint dict)."""
    from bevctl.train.loop import build_model

    ckpt = load_checkpoint(checkpoint)
    cfg = dataclass_from_dict(TrainConfig, ckpt["config"], where=f"{checkpoint}: config")
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise BevctlError(f"{checkpoint}: weights do not fit model '{cfg.model}' ({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval(), cfg, ckpt


def update_confusion(conf: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor) -> None:
    """Accumulate ``conf[gt, pred]`` (C, C) int64 over valid cells. pred, gt ``(B, X, Y)``."""
    c = conf.shape[0]
    gt = gt.long()
    valid = gt < c  # 255 = ignore
    idx = gt[valid] * c + pred.long()[valid]
    conf += torch.bincount(idx, minlength=c * c).reshape(c, c).to(conf)


def iou_from_confusion(conf: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    """names: with background first. -> {"classes": {name: {...}}, "miou", "background_iou"}."""
    conf = np.asarray(conf, dtype=np.int64)
    tp = np.diag(conf)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    out: dict[str, Any] = {"classes": {}}
    ious = []
    for k, name in enumerate(names):
        union = int(tp[k] + fp[k] + fn[k])
        iou = float(tp[k] / union) if union > 0 else None
        out["classes"][name] = {"iou": iou, "tp": int(tp[k]), "fp": int(fp[k]), "fn": int(fn[k]),
                                "gt_cells": int(tp[k] + fn[k])}
        if k > 0 and iou is not None:
            ious.append(iou)
    out["background_iou"] = out["classes"][names[0]]["iou"]
    out["miou"] = float(np.mean(ious)) if ious else None
    return out


def format_markdown(result: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = [f"**{result['split']}** ({result['num_samples']} samples) — checkpoint `{result['checkpoint']}`", "",
             "| class | IoU % | GT cells |", "|---|---:|---:|"]
    for name, c in result["classes"].items():
        lines.append(f"| {name} | {pct(c['iou'])} | {c['gt_cells']} |")
    lines.append(f"| **mIoU** (without background) | **{pct(result['miou'])}** | |")
    lines += ["", f"Rules: {result['rules']}."]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def evaluate(
    checkpoint: str | Path,
    dataroot: str,
    version: str,
    split: str = "val",
    gt: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 2,
    num_workers: int = 2,
    progress: bool = True,
    temporal: bool | None = None,
) -> dict[str, Any]:
    """Per-class IoU + mIoU of ``checkpoint`` on ``split``; writes ``out`` (JSON) and ``.md``.

    ``temporal``: feed each frame the previous frame's BEV features (``prev_bev``), as the
    model saw in training. Default: on for pretraining runs with a temporal loss (they train
    with ``prev_bev``), off for fine-tuned ones (trained frame by frame)."""
    from bevctl.data.nuscenes import load_index
    from bevctl.train.dataset import eval_dataset
    from bevctl.train.distributed import resolve_device
    from bevctl.train.loop import _collate, loader_worker_init, model_image_hw
    from bevctl.train.tasks import cur_T_prev, normalize_images, to_device

    dev = resolve_device(device)
    if out is not None:  # a bad --out URL fails before the evaluation, not after it
        from bevctl.storage import location

        location.check(out)
    model, cfg, ckpt = load_trained_model(checkpoint, dev)
    if temporal is None:
        temporal = ckpt.get("run", {}).get("mode") == "pretrain" and cfg.temporal_weight > 0
    if temporal:
        batch_size = 1  # frames in scene order, each with its predecessor's BEV
    grid, class_set = grid_from_name(cfg.grid), class_set_from_name(cfg.class_set)
    index = load_index(dataroot, version)
    ds = eval_dataset(index, split, model_image_hw(cfg), grid, class_set, gt)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=loader_worker_init)
    c = class_set.num_classes
    conf = torch.zeros(c, c, dtype=torch.int64)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress) as bar:
        task = bar.add_task("eval", total=len(ds))
        prev: tuple[str, torch.Tensor, torch.Tensor] | None = None  # (token, bev, global_T_ego)
        for i, batch in enumerate(loader):
            b = to_device(batch, dev)
            kwargs = {}
            if temporal and prev is not None and ds.samples[i].prev_token == prev[0]:
                kwargs = {"prev_bev": prev[1], "cur_T_prev": cur_T_prev(b["global_T_ego"], prev[2])}
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                o = model(normalize_images(b["images"]), b["pix_T_cam"], b["ego_T_cam"], **kwargs)
            logits = o.logits
            if temporal:
                prev = (batch["token"][0], o.bev, b["global_T_ego"])
            update_confusion(conf, logits.float().argmax(1).cpu(), batch["bev_gt"])
            bar.advance(task, len(batch["token"]))
    result = {"checkpoint": str(checkpoint), "dataroot": str(dataroot), "version": version, "split": split,
              "num_samples": len(ds), "temporal": bool(temporal), "grid": cfg.grid, "class_set": cfg.class_set, "rules": RULES,
              **iou_from_confusion(conf.numpy(), class_set.names_with_background),
              "confusion": conf.tolist()}
    if out is not None:  # a local path or a URL; each file written whole
        from bevctl.storage import location

        location.write_text_atomic(out, json.dumps(result, indent=2) + "\n")
        location.write_text_atomic(location.with_suffix(out, ".md"), format_markdown(result))
    return result
