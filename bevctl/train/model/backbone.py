"""Image backbone (transformers ``AutoBackbone``) and an FPN neck to the attention width.

Random init by default (a ``ResNetConfig`` built from the model config); with
``backbone_pretrained`` set, ``AutoBackbone.from_pretrained(id_or_dir, trust_remote_code=False)``
(e.g. ``microsoft/resnet-50`` or a directory written by ``save_pretrained``). Pretrained ResNets
expect ImageNet-normalised RGB input: the models normalise the data pipeline's uint8 images
themselves (:func:`normalize_images`, the one place that does it).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from bevctl.errors import BevctlError
from bevctl.train.model.config import ModelConfig

Tensor = torch.Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: Tensor) -> Tensor:
    """uint8 RGB ``(..., 3, H, W)`` -> ImageNet-normalised float32. Float input is taken as
    already normalised and passed through (as float32)."""
    if images.dtype != torch.uint8:
        return images.float()
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def build_backbone(cfg: ModelConfig, hf_config: dict | None = None) -> nn.Module:
    """A transformers backbone returning ``cfg.backbone_out_stages`` (1-based) feature maps.

    ``hf_config`` (a transformers config as a dict, see :func:`backbone_hf_config`) rebuilds the
    architecture of a pretrained backbone without fetching its weights (used when a checkpoint
    is loaded: its own weights replace them anyway).
    """
    from transformers import AutoBackbone, AutoConfig, ResNetConfig  # noqa: PLC0415 - transformers: seconds to import; only when a Mask2Former or a ResNet backbone is built

    out_features = [f"stage{s}" for s in cfg.backbone_out_stages]
    if hf_config is not None:
        conf = dict(hf_config)
        model_type = conf.pop("model_type", None)
        if not isinstance(model_type, str):
            raise BevctlError("backbone config: no model_type")
        config = AutoConfig.for_model(model_type, **conf)
        model = AutoBackbone.from_config(config)
    elif cfg.backbone_pretrained:
        model = _load_pretrained(cfg.backbone_pretrained, out_features)
    else:
        last = max(cfg.backbone_out_stages)  # stages after the last used one would get no gradient
        config = ResNetConfig(
            num_channels=3,
            embedding_size=cfg.backbone_stem,
            hidden_sizes=list(cfg.backbone_widths[:last]),
            depths=list(cfg.backbone_depths[:last]),
            layer_type=cfg.backbone_layer_type,
            out_features=out_features,
        )
        model = AutoBackbone.from_config(config)
    _prune_unused_stages(model, max(cfg.backbone_out_stages))
    if cfg.backbone_norm_eval:
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                for prm in mod.parameters():
                    prm.requires_grad_(False)
    return model


def _load_pretrained(source: str, out_features: list[str]) -> nn.Module:
    """Backbone weights from a hub id or a local directory (``trust_remote_code=False``).

    Resolves the backbone class from the checkpoint's config ourselves: ``AutoBackbone.from_pretrained``
    of transformers 5 asks the hub whether the repo exists first, which fails for local directories
    and offline.
    """
    from transformers import AutoConfig  # noqa: PLC0415 - transformers: seconds to import; only when a Mask2Former or a ResNet backbone is built
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING  # noqa: PLC0415 - transformers: seconds to import; only when a Mask2Former or a ResNet backbone is built

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        config.out_features = out_features
        cls = MODEL_FOR_BACKBONE_MAPPING[type(config)]
        return cls.from_pretrained(source, config=config)
    except KeyError:
        raise BevctlError(f"backbone '{source}': model type has no transformers backbone class") from None
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BevctlError(f"backbone '{source}': cannot load ({first})") from None


def _prune_unused_stages(model: nn.Module, last: int) -> None:
    """Drop ResNet-like stages after ``last`` (pretrained models keep all four)."""
    encoder = getattr(model, "encoder", None)
    stages = getattr(encoder, "stages", None)
    if isinstance(stages, nn.ModuleList) and len(stages) > last:
        encoder.stages = stages[:last]  # type: ignore[union-attr]


def backbone_hf_config(model: nn.Module) -> dict:
    """The backbone's transformers config as a plain dict (what :func:`build_backbone` takes back)."""
    conf = model.config.to_dict()  # type: ignore[union-attr]
    return json.loads(json.dumps(conf, default=str))  # plain JSON types only (weights_only safe)


def backbone_channels(model: nn.Module) -> list[int]:
    channels = getattr(model, "channels", None)
    if not channels:
        raise BevctlError(f"backbone {type(model).__name__} does not report its output channels")
    return list(channels)


def set_norm_eval(model: nn.Module) -> None:
    """Put every BatchNorm of ``model`` in eval mode (frozen running statistics)."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()


class FPN(nn.Module):
    """Feature pyramid: 1x1 laterals, top-down nearest upsampling + add, 3x3 outputs; extra
    levels by stride-2 3x3 convs on the last output (ReLU before each, as in BEVFormer's neck)."""

    def __init__(self, in_channels: list[int], out_channels: int, num_outs: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, out_channels, 1) for c in in_channels])
        self.output = nn.ModuleList([nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels])
        self.extra = nn.ModuleList(
            [nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(num_outs - len(in_channels))]
        )
        for conv in [*self.lateral, *self.output, *self.extra]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.output, lat)]
        for conv in self.extra:
            outs.append(conv(F.relu(outs[-1])))
        return outs


class ImageEncoder(nn.Module):
    """Backbone + FPN: images ``(B*N, 3, H, W)`` -> ``num_levels`` maps ``(B*N, D, H_l, W_l)``."""

    def __init__(self, cfg: ModelConfig, hf_config: dict | None = None) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg, hf_config)
        self.neck = FPN(backbone_channels(self.backbone), cfg.embed_dim, cfg.num_levels)
        self.norm_eval = cfg.backbone_norm_eval

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if mode and self.norm_eval:
            set_norm_eval(self.backbone)
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        feats = list(self.backbone(images).feature_maps)
        return self.neck(feats)
