"""Training configuration: one dataclass, presets, strict YAML loading."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bevctl.config import dataclass_from_dict, is_yaml_path, load_yaml, resolve_class_set, resolve_grid
from bevctl.errors import BevctlError


@dataclass
class TrainConfig:
    """Everything a training run needs besides data paths. Saved into every run and checkpoint."""

    # Each of model, grid, class_set: a preset name or a YAML file (bevctl.train.build resolves them)
    model: str = "demo"  # model preset (bevctl.train.model.model_preset), "toy" (stand-in) or YAML
    grid: str = "demo"  # BEV grid preset or YAML
    class_set: str = "hdmapnet"  # BEV class set preset or YAML
    image_hw: Optional[tuple[int, ...]] = None  # model input (H, W); None = the model preset's
    backbone_pretrained: Optional[str] = None  # hub id or local dir of ImageNet weights (None = random init)
    label_hw: Optional[tuple[int, ...]] = None  # reprojection-loss label resolution; None = store's
    # optimisation
    batch_size: int = 1  # per process, per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    epochs: int = 1
    max_steps: int = 0  # 0 = no limit beyond epochs; otherwise whichever ends first
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 35.0  # max global grad norm; 0 = off
    amp: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; off on CPU) | off | bf16 | fp16
    # losses
    reproj_weight: float = 1.0
    temporal_weight: float = 0.1  # 0 = no previous frame; high values over-smooth
    # Reprojection also into the cameras of the K keyframes before and after the sample (their
    # pseudo-labels, placed by the ego motion): supervises cells that no camera of the sample
    # sees, under and around the ego. 0 = the sample's own cameras only (the paper's loss).
    label_adjacent: int = 0
    detach_prev: bool = True  # temporal target (warped previous prediction) is detached
    min_confidence: float = 0.0  # pseudo-label pixels below this confidence are ignored
    class_weights: Optional[tuple[float, ...]] = None  # per BEV id (background first)
    dice_weight: float = 0.0  # supervised: + dice_weight * soft Dice
    label_map: Optional[str] = None  # YAML mapping labeler classes -> BEV classes (None = built in)
    # Keep the image backbone's weights and BatchNorm statistics fixed (fine-tuning a pretrained
    # model: the backbone saw every scene in pretraining; a frozen backbone also skips its backward).
    freeze_backbone: bool = False
    # data
    fraction: float = 1.0  # finetune: fraction of labelled training scenes
    train_split: str = "train"
    num_workers: int = 2
    prefetch_factor: int = 4
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 200  # steps
    keep_checkpoints: int = 3  # step checkpoints kept besides last.pt
    log_every: int = 1

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise BevctlError(f"train config: {msg}")

        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        need(self.amp in ("auto", "off", "bf16", "fp16"), f"amp must be auto|off|bf16|fp16, got {self.amp!r}")
        need(0 < self.fraction <= 1, f"fraction must be in (0, 1], got {self.fraction}")
        need(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        need(self.reproj_weight >= 0 and self.temporal_weight >= 0, "loss weights must be >= 0")
        need(self.num_workers >= 0, "num_workers must be >= 0")
        need(self.label_adjacent >= 0, f"label_adjacent must be >= 0, got {self.label_adjacent}")
        for name in ("image_hw", "label_hw"):
            v = getattr(self, name)
            if v is not None:
                need(len(v) == 2 and all(int(x) > 0 for x in v), f"{name} must be [H, W], got {v}")
                setattr(self, name, tuple(int(x) for x in v))


TRAIN_PRESETS: dict[str, dict] = {
    # CPU-sized: the demo model on the demo grid (the demo and the slow tests use it).
    # class_weights (background, boundary, ped_crossing, divider): without them the CE is
    # dominated by road/background and thin markings stay at 0 IoU (docs/demo_tuning.md:
    # pretrain-only val mIoU 2.1% -> 9.2%, supervised 100% at 1000 steps 67% on the quick world).
    "demo": {"model": "demo", "grid": "demo", "batch_size": 2, "lr": 1e-3,
             "class_weights": (1.0, 8.0, 3.0, 8.0)},
    # The stand-in IPM model (bevctl.train.toy) on the demo grid: trainer tests and benchmarks.
    "toy": {"model": "toy", "grid": "demo", "batch_size": 2, "lr": 3e-3, "num_workers": 0},
    # BEVFormer-tiny on the hdmapnet grid (one GPU).
    "tiny": {"model": "tiny", "grid": "hdmapnet", "batch_size": 1, "num_workers": 4,
             "warmup_steps": 500, "checkpoint_every": 1000},
    # The paper's setting: hdmapnet grid, BEVFormer-base, 8 GPUs x 1 sample.
    "hdmapnet": {"model": "base", "grid": "hdmapnet", "batch_size": 1, "lr": 2e-4, "epochs": 24,
                 "warmup_steps": 500, "num_workers": 6, "checkpoint_every": 1000},
}


def load_train_config(spec: str | None, **overrides) -> TrainConfig:
    """A preset name or a YAML file (keys of :class:`TrainConfig`), then CLI ``overrides``
    (``None`` values are skipped)."""
    data: dict = {}
    if spec:
        if spec in TRAIN_PRESETS:
            data = dict(TRAIN_PRESETS[spec])
        elif Path(spec).suffix in (".yaml", ".yml") or Path(spec).exists():
            data = load_yaml(spec)
        else:
            raise BevctlError(f"--config: '{spec}' is neither a preset ({', '.join(TRAIN_PRESETS)}) nor a file")
    data.update({k: v for k, v in overrides.items() if v is not None})
    where = f"train config {spec or ''}".strip()
    try:
        cfg = dataclass_from_dict(TrainConfig, data, where=where)
    except BevctlError as e:  # name where the bad value came from: the CLI option or the file
        msg = str(e)
        if not msg.startswith("train config: "):
            raise
        body = msg[len("train config: "):]
        field = body.split(" ", 1)[0]
        source = f"--{field.replace('_', '-')}" if overrides.get(field) is not None else where
        raise BevctlError(f"{source}: {body}") from None
    # YAML files named for model, grid, class set, label map: absolute, so that the run's saved
    # config still finds them from another directory
    for key in ("model", "grid", "class_set", "label_map"):
        value = getattr(cfg, key)
        if value is not None and is_yaml_path(value):
            setattr(cfg, key, str(Path(value).expanduser().resolve()))
    # an unknown grid or class set fails here, before any data is read; the model (which needs
    # torch) when bevctl.train.build.resolve() resolves the whole config
    resolve_grid(cfg.grid)
    resolve_class_set(cfg.class_set)
    return cfg


def config_diff(a: TrainConfig, b: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Field names whose values differ."""
    return [f.name for f in dataclasses.fields(a)
            if f.name not in ignore and getattr(a, f.name) != getattr(b, f.name)]
