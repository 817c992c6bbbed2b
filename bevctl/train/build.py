"""One place that resolves a :class:`TrainConfig` into the objects a run needs, and builds its
model.

Each of ``cfg.grid``, ``cfg.class_set`` and ``cfg.model`` is a preset name or a YAML file
(:func:`bevctl.config.resolve_grid`, :func:`bevctl.config.resolve_class_set`,
:func:`bevctl.train.model.resolve_model_config`); ``model: toy`` is the stand-in of
:mod:`bevctl.train.model.toy`. The training loop, the dataset, ``evaluate``, ``visualize`` and
``predict`` all read them from here, so they cannot disagree on the grid or the input size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bevctl.config import BEVClassSet, BEVGrid, dataclass_from_dict, resolve_class_set, resolve_grid
from bevctl.errors import BevctlError
from bevctl.train.checkpoint import load_checkpoint
from bevctl.train.config import TrainConfig
from bevctl.train.model import BEVFormer, ModelConfig, resolve_model_config
from bevctl.train.model.toy import TOY_IMAGE_HW, ToyBEVModel


@dataclass(frozen=True)
class ModelSetup:
    """What a :class:`TrainConfig` resolves to."""

    grid: BEVGrid  # the target BEV grid
    class_set: BEVClassSet
    model_config: ModelConfig | None  # None: the toy stand-in
    image_hw: tuple[int, int]  # model input (H, W): the data pipeline resizes images to it

    @property
    def num_classes(self) -> int:
        """Output channels, background included."""
        return self.class_set.num_classes


def resolve(cfg: TrainConfig) -> ModelSetup:
    """Grid, class set, model config and input size of ``cfg`` (one error line for a bad name or file)."""
    grid = resolve_grid(cfg.grid)
    class_set = resolve_class_set(cfg.class_set)
    if cfg.model == "toy":
        image_hw = tuple(cfg.image_hw) if cfg.image_hw is not None else TOY_IMAGE_HW
        return ModelSetup(grid, class_set, None, image_hw)  # type: ignore[arg-type]
    mc = resolve_model_config(cfg.model)
    if cfg.image_hw is not None and tuple(cfg.image_hw) != tuple(mc.image_hw):
        mc = dataclasses.replace(mc, image_hw=tuple(cfg.image_hw))
    if cfg.backbone_pretrained is not None:
        mc = dataclasses.replace(mc, backbone_pretrained=cfg.backbone_pretrained, backbone_norm_eval=True)
    return ModelSetup(grid, class_set, mc, tuple(mc.image_hw))  # type: ignore[arg-type]


def build_model(cfg: TrainConfig | ModelSetup) -> nn.Module:
    """A freshly initialised model (BEVFormer, or the toy stand-in) for the resolved grid and classes."""
    setup = cfg if isinstance(cfg, ModelSetup) else resolve(cfg)
    if setup.model_config is None:
        return ToyBEVModel(setup.grid, setup.num_classes, setup.image_hw)
    return BEVFormer(setup.model_config, setup.grid, setup.num_classes)


@dataclass
class TrainedModel:
    """A checkpoint loaded into a ready model (eval mode, on its device)."""

    model: nn.Module
    cfg: TrainConfig  # the config the run trained with
    setup: ModelSetup  # what it resolves to
    run: dict[str, Any]  # the run's record (mode, data paths, total_steps, ...), {} if none
    path: str  # the checkpoint (a run directory resolves to its last.pt)


def load_trained_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> TrainedModel:
    """Load a bevctl training checkpoint (a ``.pt`` file, or a run directory: its ``last.pt``; a
    local path or a URL) with ``weights_only=True``, rebuild its model from the saved config
    and load the weights; one error line if the file is no checkpoint or the weights do not fit."""
    ckpt = load_checkpoint(checkpoint)
    cfg = dataclass_from_dict(TrainConfig, ckpt["config"], where=f"{checkpoint}: config")
    setup = resolve(cfg)
    model = build_model(setup)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise BevctlError(f"{checkpoint}: weights do not fit model '{cfg.model}' "
                          f"({str(e).splitlines()[0][:160]})") from None
    run = ckpt.get("run") if isinstance(ckpt.get("run"), dict) else {}
    return TrainedModel(model.to(device).eval(), cfg, setup, dict(run), str(checkpoint))
