"""BEVFormer for BEV segmentation (pure PyTorch). See :mod:`bevctl.train.model` for the interface."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bevctl import geometry
from bevctl.config import BEVGrid, dataclass_from_dict, dataclass_to_dict
from bevctl.errors import BevctlError
from bevctl.train.model.attention import no_autocast
from bevctl.train.model.backbone import ImageEncoder, backbone_hf_config, normalize_images
from bevctl.train.model.config import ModelConfig
from bevctl.train.model.encoder import BEVEncoder
from bevctl.train.model.head import SegHead

Tensor = torch.Tensor


@dataclass
class BEVFormerOutput:
    logits: Tensor  # (B, num_classes, X, Y) on the target grid
    bev: Tensor  # (B, D, Xq, Yq) on the query grid; the next frame's prev_bev


def align_prev_bev(prev_bev: Tensor, cur_T_prev: Tensor, grid: BEVGrid) -> tuple[Tensor, Tensor]:
    """Resample the previous frame's BEV ``(B, C, X, Y)`` into the current ego frame, exactly.

    ``cur_T_prev (B, 4, 4)`` maps points in the previous ego frame to the current one. Each
    current cell centre (on the ground) is mapped back with ``prev_T_cur`` and the previous map
    is sampled bilinearly there. Returns the aligned map and ``valid (B, X, Y)`` (the point
    falls inside the previous grid). Thin wrapper of :func:`bevctl.geometry.warp_bev` with the
    current frame playing "global".
    """
    eye = torch.eye(4, dtype=cur_T_prev.dtype, device=cur_T_prev.device).expand_as(cur_T_prev)
    return geometry.warp_bev(prev_bev, cur_T_prev, eye, grid)


class BEVFormer(nn.Module):
    def __init__(self, cfg: ModelConfig, grid: BEVGrid, num_classes: int, *,
                 backbone_config: dict | None = None) -> None:  # fmt: skip
        """``backbone_config``: rebuild a pretrained backbone's architecture from its saved
        transformers config instead of loading ``cfg.backbone_pretrained`` (see :func:`load_model`)."""
        super().__init__()
        if num_classes < 2:
            raise BevctlError(f"BEVFormer: num_classes must include background (>= 2), got {num_classes}")
        self.cfg, self.grid, self.num_classes = cfg, grid, num_classes
        self.query_grid = grid.coarsened(cfg.bev_downsample)
        xq, yq = self.query_grid.shape
        d = cfg.embed_dim
        self.image_encoder = ImageEncoder(cfg, backbone_config)
        self.bev_queries = nn.Parameter(torch.randn(xq * yq, d) * 0.02)
        self.pos_row = nn.Parameter(torch.rand(xq, d // 2))  # learned positional encoding, per x
        self.pos_col = nn.Parameter(torch.rand(yq, d // 2))  # ... and per y
        self.level_embeds = nn.Parameter(torch.randn(cfg.num_levels, d) * 0.02)
        self.cams_embeds = nn.Parameter(torch.randn(cfg.num_cams, d) * 0.02)
        self.encoder = BEVEncoder(
            cfg.num_layers, cfg.grad_checkpoint, dim=d, heads=cfg.num_heads, levels=cfg.num_levels,
            sca_points=cfg.sca_points, z_anchors=cfg.num_points_in_pillar, tsa_points=cfg.tsa_points,
            ffn_dim=cfg.ffn_dim, dropout=cfg.dropout, sca_gather=cfg.sca_gather,
        )  # fmt: skip
        self.head = SegHead(d, num_classes, cfg.bev_downsample, cfg.head_channels)
        # Geometry constants (not saved: they follow from cfg and grid).
        dev = self.pos_row.device  # explicit, so building under `with torch.device("meta")` is consistent
        centres = geometry.bev_cell_centers(self.query_grid, device=dev)  # (Xq, Yq, 2)
        zs = torch.linspace(cfg.pillar_z[0], cfg.pillar_z[1], cfg.num_points_in_pillar, device=dev)
        pillars = torch.cat(
            [centres.reshape(-1, 1, 2).expand(-1, zs.numel(), 2), zs.view(1, -1, 1).expand(xq * yq, -1, 1)], -1
        )  # (Q, Z, 3) ego points
        self.register_buffer("pillars", pillars, persistent=False)
        ii, jj = torch.meshgrid(torch.arange(xq, device=dev) + 0.5, torch.arange(yq, device=dev) + 0.5, indexing="ij")
        tsa_ref = torch.stack([jj / yq, ii / xq], -1).reshape(-1, 2)  # (Q, 2) as (along Y, along X)
        self.register_buffer("tsa_ref", tsa_ref, persistent=False)

    # ------------------------------------------------------------------------------------------
    def pillar_visibility(self, pix_T_cam: Tensor, ego_T_cam: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Project every pillar point into every camera.

        Returns ``ref (B, N, Q, Z, 2)``: normalised image positions ``((u + 0.5) / W, (v + 0.5) / H)``
        and ``visible (B, N, Q, Z)``: in front of the camera and inside the image.
        """
        h, w = hw
        with no_autocast(pix_T_cam.device):
            pts = self.pillars.float().reshape(1, 1, -1, 3)
            uv, depth = geometry.ego_to_pixels(pix_T_cam.float()[:, :, None], ego_T_cam.float()[:, :, None], pts)
            visible = geometry.in_image(uv, depth, w, h)  # (B, N, Q*Z)
            ref = (uv + 0.5) / uv.new_tensor([w, h])
        b, n = pix_T_cam.shape[:2]
        q, z = self.pillars.shape[:2]
        return ref.view(b, n, q, z, 2), visible.view(b, n, q, z)

    def positional_encoding(self) -> Tensor:
        """``(1, Q, D)``: concat of a per-row and a per-column learned embedding."""
        xq, yq = self.query_grid.shape
        d2 = self.pos_row.shape[1]
        pos = torch.cat([self.pos_row[:, None, :].expand(xq, yq, d2), self.pos_col[None, :, :].expand(xq, yq, d2)], -1)
        return pos.reshape(1, xq * yq, 2 * d2)

    def _check_inputs(self, images: Tensor, pix_T_cam: Tensor, ego_T_cam: Tensor,
                      prev_bev: Tensor | None, cur_T_prev: Tensor | None) -> None:  # fmt: skip
        if images.dim() != 5 or images.shape[2] != 3:
            raise BevctlError(f"BEVFormer: images must be (B, N, 3, H, W), got {tuple(images.shape)}")
        b, n = images.shape[:2]
        if n > self.cfg.num_cams:
            raise BevctlError(f"BEVFormer: {n} cameras but the model has num_cams={self.cfg.num_cams}")
        if tuple(pix_T_cam.shape) != (b, n, 3, 3):
            raise BevctlError(f"BEVFormer: pix_T_cam must be {(b, n, 3, 3)}, got {tuple(pix_T_cam.shape)}")
        if tuple(ego_T_cam.shape) != (b, n, 4, 4):
            raise BevctlError(f"BEVFormer: ego_T_cam must be {(b, n, 4, 4)}, got {tuple(ego_T_cam.shape)}")
        if prev_bev is not None:
            want = (b, self.cfg.embed_dim, *self.query_grid.shape)
            if tuple(prev_bev.shape) != want:
                raise BevctlError(f"BEVFormer: prev_bev must be {want}, got {tuple(prev_bev.shape)}")
            if cur_T_prev is None or tuple(cur_T_prev.shape) != (b, 4, 4):
                raise BevctlError("BEVFormer: prev_bev given without cur_T_prev of shape (B, 4, 4)")

    def forward(
        self,
        images: Tensor,  # (B, N, 3, H, W) uint8 RGB, or float already normalised
        pix_T_cam: Tensor,  # (B, N, 3, 3) for (H, W)
        ego_T_cam: Tensor,  # (B, N, 4, 4)
        prev_bev: Tensor | None = None,  # (B, D, Xq, Yq)
        cur_T_prev: Tensor | None = None,  # (B, 4, 4)
    ) -> BEVFormerOutput:
        self._check_inputs(images, pix_T_cam, ego_T_cam, prev_bev, cur_T_prev)
        images = normalize_images(images)
        b, n, _, h, w = images.shape
        xq, yq = self.query_grid.shape
        d = self.cfg.embed_dim

        feats = self.image_encoder(images.flatten(0, 1))  # per level (B*N, D, H_l, W_l)
        cam = self.cams_embeds[:n].repeat(b, 1)  # (B*N, D), batch-major like images.flatten
        feats = [f + (cam + self.level_embeds[lvl]).to(f.dtype)[:, :, None, None] for lvl, f in enumerate(feats)]
        ref, visible = self.pillar_visibility(pix_T_cam, ego_T_cam, (h, w))

        prev = prev_valid = None
        if prev_bev is not None:
            assert cur_T_prev is not None
            with no_autocast(prev_bev.device):
                aligned, valid = align_prev_bev(prev_bev.float(), cur_T_prev.float(), self.query_grid)
            prev = aligned.flatten(2).transpose(1, 2).to(prev_bev.dtype)  # (B, Q, D)
            prev_valid = valid.reshape(b, -1, 1)

        queries = self.bev_queries.unsqueeze(0).expand(b, -1, -1)
        pos = self.positional_encoding()
        x = self.encoder(queries, pos, prev, prev_valid, self.tsa_ref, (xq, yq), feats, ref, visible)
        bev = x.transpose(1, 2).reshape(b, d, xq, yq)
        return BEVFormerOutput(logits=self.head(bev), bev=bev)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def compile_model(model: BEVFormer, **kwargs: Any) -> nn.Module:
    """``torch.compile`` with static shapes. With ``cfg.sca_gather`` (default) the number of
    queries a camera sees is read once per forward (a graph break; a recompile when the rig
    changes); ``sca_gather=False`` gives one graph at ~N x the cross-attention cost."""
    kwargs.setdefault("dynamic", False)
    return torch.compile(model, **kwargs)  # type: ignore[return-value]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts per top-level part and in total."""
    parts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in model.named_children()}
    own = sum(p.numel() for name, p in model.named_parameters(recurse=False))
    parts["queries_and_embeddings"] = own
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts


def save_model(model: BEVFormer, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Atomically write config, grid, num_classes and weights (loadable with weights_only=True)."""
    path = Path(path)
    payload = {
        "format": "bevctl.bevformer/1",
        "config": dataclass_to_dict(model.cfg),
        "grid": dataclasses.asdict(model.grid),
        "num_classes": model.num_classes,
        "backbone_config": backbone_hf_config(model.image_encoder.backbone) if model.cfg.backbone_pretrained else None,
        "state_dict": model.state_dict(),
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> BEVFormer:
    """Rebuild a model written by :func:`save_model` (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise BevctlError(f"model checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise BevctlError(f"{path}: not a loadable checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != "bevctl.bevformer/1":
        raise BevctlError(f"{path}: not a bevctl BEVFormer checkpoint")
    cfg = dataclass_from_dict(ModelConfig, payload["config"], f"{path}:config")
    grid = dataclass_from_dict(BEVGrid, payload["grid"], f"{path}:grid")
    model = BEVFormer(cfg, grid, int(payload["num_classes"]), backbone_config=payload.get("backbone_config"))
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise BevctlError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(map_location)
