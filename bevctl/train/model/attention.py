"""Multi-scale deformable attention in pure PyTorch (``grid_sample``), and a slow reference.

Conventions of the core op (as in Deformable DETR):

- ``values``: one tensor per level, ``(B, M, Dh, H_l, W_l)`` (M heads of Dh channels).
- ``locations``: ``(B, Q, M, L, P, 2)`` normalised to ``[0, 1]`` as ``(x, y)`` = (along W, along H),
  with ``align_corners=False`` semantics: ``0`` is the left edge of the first pixel, ``1`` the right
  edge of the last, so feature pixel ``i`` has its centre at ``(i + 0.5) / W``. For an image of width
  ``W_img`` whose pixel centres sit at integer ``u`` (nuScenes intrinsics), ``x = (u + 0.5) / W_img``
  on every pyramid level.
- ``weights``: ``(B, Q, M, L, P)``, already normalised by the caller.
- Samples outside the map read zeros. Returns ``(B, Q, M * Dh)``.

The op runs in float32 whatever the autocast state (sampling positions need the precision:
a half-precision ``x`` at 1600 px is off by up to a pixel).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A context with autocast off on ``device`` (a no-op where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def ms_deform_attn(values: list[Tensor], locations: Tensor, weights: Tensor) -> Tensor:
    """Multi-scale deformable attention (see the module docstring for shapes)."""
    b, q, m, n_lvl, p, _ = locations.shape
    if len(values) != n_lvl:
        raise ValueError(f"ms_deform_attn: {len(values)} value levels for {n_lvl} location levels")
    out_dtype = values[0].dtype
    with no_autocast(locations.device):
        grids = (2.0 * locations.float() - 1.0).permute(0, 2, 3, 1, 4, 5)  # (B, M, L, Q, P, 2)
        w = weights.float().permute(0, 2, 3, 1, 4)  # (B, M, L, Q, P)
        out = None
        for lvl, value in enumerate(values):
            _, _, dh, h, wd = value.shape
            v = value.float().reshape(b * m, dh, h, wd)
            g = grids[:, :, lvl].reshape(b * m, q, p, 2)
            sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
            # (B*M, Dh, Q, P) weighted over P -> (B*M, Dh, Q)
            part = (sampled * w[:, :, lvl].reshape(b * m, 1, q, p)).sum(-1)
            out = part if out is None else out + part
        assert out is not None
        out = out.reshape(b, m, -1, q).permute(0, 3, 1, 2).reshape(b, q, -1)
    return out.to(out_dtype)


def _bilinear_zero_pad(img: Tensor, x: float, y: float) -> Tensor:
    """Sample ``img (C, H, W)`` at pixel coordinates ``(x, y)`` (centres at integers), zeros outside."""
    c, h, w = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(c, dtype=img.dtype)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out = out + wy * wx * img[:, yy, xx]
    return out


def ms_deform_attn_reference(values: list[Tensor], locations: Tensor, weights: Tensor) -> Tensor:
    """The same as :func:`ms_deform_attn`, with explicit loops (slow; for tests and benchmarks)."""
    b, q, m, n_lvl, p, _ = locations.shape
    dh = values[0].shape[2]
    out = torch.zeros(b, q, m, dh, dtype=torch.float64)
    for bi in range(b):
        for qi in range(q):
            for mi in range(m):
                for li in range(n_lvl):
                    img = values[li][bi, mi].double()
                    h, w = img.shape[-2:]
                    for pi in range(p):
                        lx, ly = locations[bi, qi, mi, li, pi].tolist()
                        # align_corners=False: normalised 0..1 spans the outer pixel edges
                        sample = _bilinear_zero_pad(img, lx * w - 0.5, ly * h - 0.5)
                        out[bi, qi, mi] += float(weights[bi, qi, mi, li, pi]) * sample
    return out.reshape(b, q, m * dh)


def softmax_fp32(logits: Tensor, dim: int = -1) -> Tensor:
    """Softmax computed in float32 (AMP-safe), returned in float32."""
    return torch.softmax(logits.float(), dim=dim)


def init_sampling_offsets(linear: nn.Linear, num_heads: int, groups: int, points: int) -> None:
    """Deformable-DETR style init: zero weights; each head's bias points in its own direction,
    the k-th point ``k + 1`` cells out. ``linear.out_features = num_heads * groups * points * 2``
    laid out as ``(heads, groups, points, 2)``."""
    nn.init.zeros_(linear.weight)
    angles = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
    dirs = torch.stack([angles.cos(), angles.sin()], -1)
    dirs = dirs / dirs.abs().max(-1, keepdim=True).values  # (M, 2) on the unit square
    scale = torch.arange(1, points + 1, dtype=torch.float32).view(1, 1, points, 1)
    bias = dirs.view(num_heads, 1, 1, 2) * scale  # (M, 1, P, 2)
    bias = bias.expand(num_heads, groups, points, 2)
    with torch.no_grad():
        linear.bias.copy_(bias.reshape(-1))
