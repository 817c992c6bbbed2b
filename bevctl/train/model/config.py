"""Model configuration: :class:`ModelConfig` and the presets ``demo``, ``tiny``, ``small``, ``base``.

The ``tiny``/``small``/``base`` presets mirror the tiny, small and base configurations published
with BEVFormer (Li et al., ECCV 2022):

- common: embed 256, FFN 512, 8 heads; temporal self-attention with 4 points over 1 level
  (TemporalSelfAttention defaults); spatial cross-attention (MSDeformableAttention3D) with
  8 points per head and level spread over ``num_points_in_pillar=4`` pillar heights; dropout 0.1.
- tiny: ResNet-50, C5 only (1 level), images x0.5 (450x800), BEV 50x50, 3 encoder layers.
- small: ResNet-101, C5 only (1 level), images x0.8 (720x1280), BEV 150x150, 3 layers.
- base: ResNet-101, C3-C5 + 1 extra FPN level (4 levels), full 900x1600 images, BEV 200x200,
  6 layers.

Differences, on purpose: BEVFormer's small/base use DCNv2 in stages 3-4 of a caffe-style
ResNet-101 (an mmcv CUDA op); here the backbone is a plain transformers ResNet. BEVFormer's
query grid covers 102.4 m x 102.4 m for detection; for segmentation the query grid is the
target grid coarsened by ``bev_downsample`` and the head upsamples back. On the 0.15 m
``hdmapnet`` grid (400 x 200) that gives 50x25 (tiny, x8), 100x50 (small, x4) and 200x100
(base, x2) queries: base keeps BEVFormer's 200 rows. BEVFormer's pillars span the lidar range
z in [-5, 3] m (lidar ~1.8 m above ground); ours are in the ego frame (z = 0 is the ground)
and default to z in [-1, 2] m so that one of the 4 heights lies on the road surface itself.
BEVFormer starts from pretrained weights with frozen BatchNorm (``norm_eval``) and a frozen stem
+ stage 1; the presets here start from random init, so BatchNorm trains by default — set
``backbone_pretrained`` (e.g. ``microsoft/resnet-50``) and ``backbone_norm_eval=True`` to match.

Every field is overridable: ``dataclasses.replace(model_preset("demo"), embed_dim=64)``, or
from YAML through :func:`model_config_from_dict` (strict: unknown keys are an error).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bevctl.config import dataclass_from_dict, is_yaml_path, load_yaml
from bevctl.errors import BevctlError


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    # --- image backbone (transformers ResNet) -------------------------------------------------
    # A hub id or local directory of a transformers backbone (loaded with
    # trust_remote_code=False); None = random init from the fields below.
    backbone_pretrained: str | None = None
    backbone_layer_type: str = "basic"  # "basic" (ResNet-18/34) or "bottleneck" (ResNet-50+)
    backbone_stem: int = 64  # stem (embedding) channels
    backbone_widths: tuple[int, ...] = (64, 128, 256, 512)  # per-stage output channels
    backbone_depths: tuple[int, ...] = (2, 2, 2, 2)  # blocks per stage
    backbone_out_stages: tuple[int, ...] = (4,)  # 1-based stages fed to the FPN (4 = C5)
    backbone_norm_eval: bool = False  # keep backbone BatchNorm frozen (as BEVFormer does)
    image_hw: tuple[int, int] = (450, 800)  # what the data pipeline resizes images to
    num_cams: int = 6
    # --- neck and attention ---------------------------------------------------------------------
    embed_dim: int = 256
    num_levels: int = 1  # FPN outputs (extra levels by stride-2 convs on the last one)
    num_heads: int = 8
    ffn_dim: int = 512
    num_layers: int = 3
    dropout: float = 0.1
    # --- BEV queries ------------------------------------------------------------------------------
    bev_downsample: int = 8  # query grid = target grid coarsened by this (power of 2)
    pillar_z: tuple[float, float] = (-1.0, 2.0)  # ego-frame heights of the pillar points (m)
    num_points_in_pillar: int = 4
    sca_points: int = 8  # spatial cross-attention points per head and level (all heights)
    tsa_points: int = 4  # temporal self-attention points per head (and per queue entry)
    # Spatial cross-attention only over the queries each camera sees (BEVFormer's rebatch; ~N x
    # less work and memory). False: every camera processes every query (static shapes).
    sca_gather: bool = True
    # --- head -------------------------------------------------------------------------------------
    head_channels: int = 128  # width after the first upsampling stage halves it, min 16
    # --- runtime --------------------------------------------------------------------------------
    grad_checkpoint: bool = False  # activation checkpointing of encoder layers in training
    compile: bool = False  # the trainer wraps the model with compile_model() when set

    def __post_init__(self) -> None:
        where = f"model config '{self.name}'"
        if self.embed_dim % self.num_heads:
            raise BevctlError(f"{where}: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 2:
            raise BevctlError(f"{where}: embed_dim must be even (positional encoding halves it)")
        if self.sca_points % self.num_points_in_pillar:
            raise BevctlError(
                f"{where}: sca_points {self.sca_points} must be a multiple of num_points_in_pillar "
                f"{self.num_points_in_pillar}"
            )
        if self.bev_downsample < 1 or self.bev_downsample & (self.bev_downsample - 1):
            raise BevctlError(f"{where}: bev_downsample must be a power of 2, got {self.bev_downsample}")
        if self.backbone_layer_type not in ("basic", "bottleneck"):
            raise BevctlError(f"{where}: backbone_layer_type must be 'basic' or 'bottleneck'")
        if len(self.backbone_widths) != len(self.backbone_depths):
            raise BevctlError(f"{where}: backbone_widths and backbone_depths differ in length")
        stages = range(1, len(self.backbone_widths) + 1)
        if not self.backbone_out_stages or any(s not in stages for s in self.backbone_out_stages):
            raise BevctlError(f"{where}: backbone_out_stages {self.backbone_out_stages} not in 1..{len(stages)}")
        if list(self.backbone_out_stages) != sorted(set(self.backbone_out_stages)):
            raise BevctlError(f"{where}: backbone_out_stages must be strictly increasing")
        if self.num_levels < len(self.backbone_out_stages):
            raise BevctlError(
                f"{where}: num_levels {self.num_levels} < number of backbone_out_stages {len(self.backbone_out_stages)}"
            )
        if len(self.image_hw) != 2 or min(self.image_hw) < 32:
            raise BevctlError(f"{where}: image_hw must be (H, W) with both >= 32, got {self.image_hw}")
        if not self.pillar_z[1] >= self.pillar_z[0] or self.num_points_in_pillar < 1:
            raise BevctlError(f"{where}: bad pillar_z {self.pillar_z} / num_points_in_pillar")
        if min(self.num_layers, self.num_heads, self.tsa_points, self.ffn_dim, self.num_cams) < 1:
            raise BevctlError(f"{where}: num_layers, num_heads, tsa_points, ffn_dim, num_cams must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise BevctlError(f"{where}: dropout must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


_RESNET50 = dict(
    backbone_layer_type="bottleneck",
    backbone_stem=64,
    backbone_widths=(256, 512, 1024, 2048),
    backbone_depths=(3, 4, 6, 3),
)
_RESNET101 = dict(_RESNET50, backbone_depths=(3, 4, 23, 3))

MODEL_PRESETS: dict[str, ModelConfig] = {
    # CPU-sized: a 4-stage ResNet with tiny widths cut after stage 3, two FPN levels (/8, /16),
    # embed 32, one encoder layer, queries 4x coarser than the target grid (demo grid -> 32x16).
    "demo": ModelConfig(
        name="demo",
        backbone_layer_type="basic",
        backbone_stem=16,
        backbone_widths=(16, 32, 64),
        backbone_depths=(1, 1, 1),
        backbone_out_stages=(2, 3),
        image_hw=(96, 176),
        embed_dim=32,
        num_levels=2,
        num_heads=4,
        ffn_dim=64,
        num_layers=1,
        dropout=0.0,
        bev_downsample=4,
        sca_points=8,
        tsa_points=4,
        head_channels=32,
    ),
    "tiny": ModelConfig(
        name="tiny", **_RESNET50, backbone_out_stages=(4,), image_hw=(450, 800),
        embed_dim=256, num_levels=1, num_heads=8, ffn_dim=512, num_layers=3, dropout=0.1,
        bev_downsample=8, head_channels=128,
    ),  # fmt: skip
    "small": ModelConfig(
        name="small", **_RESNET101, backbone_out_stages=(4,), image_hw=(720, 1280),
        embed_dim=256, num_levels=1, num_heads=8, ffn_dim=512, num_layers=3, dropout=0.1,
        bev_downsample=4, head_channels=128,
    ),  # fmt: skip
    "base": ModelConfig(
        name="base", **_RESNET101, backbone_out_stages=(2, 3, 4), image_hw=(900, 1600),
        embed_dim=256, num_levels=4, num_heads=8, ffn_dim=512, num_layers=6, dropout=0.1,
        bev_downsample=2, head_channels=128,
    ),  # fmt: skip
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name (``demo``, ``tiny``, ``small``, ``base``), with optional field overrides."""
    try:
        cfg = MODEL_PRESETS[name]
    except KeyError:
        raise BevctlError(f"unknown model preset '{name}' (known: {', '.join(MODEL_PRESETS)})") from None
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:
            raise BevctlError(f"model preset '{name}': unknown field(s) {unknown}")
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg


def model_config_from_dict(data: dict[str, Any], where: str = "model") -> ModelConfig:
    """YAML mapping -> :class:`ModelConfig`. ``preset: tiny`` starts from a preset; other keys
    override its fields (strict: unknown keys and wrong types are one error line)."""
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is None:
        return dataclass_from_dict(ModelConfig, data, where)
    if not isinstance(preset, str):
        raise BevctlError(f"{where}.preset: expected a preset name, got {preset!r}")
    base = dataclasses.asdict(model_preset(preset))
    checked = dataclass_from_dict(ModelConfig, {**base, **data}, where)
    return checked


def resolve_model_config(spec: str) -> ModelConfig:
    """A model preset name or a YAML file of :class:`ModelConfig` keys (``preset:`` to start
    from a preset, see :func:`model_config_from_dict`)."""
    if is_yaml_path(spec):
        return model_config_from_dict(load_yaml(spec), where=spec)
    return model_preset(spec)
