"""BEVFormer encoder: temporal self-attention, spatial cross-attention and FFN layers.

Queries are ``(B, Q, D)`` with ``Q = Xq * Yq`` in row-major ``(X, Y)`` order: query ``i * Yq + j``
is query-grid cell ``(i, j)``. As in BEVFormer, each layer is post-norm:
``x = norm(TSA(x)); x = norm(SCA(x)); x = norm(x + FFN(x))``, and the positional encoding is
added to the queries only where they predict sampling offsets and attention weights.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from bevctl.train.model.attention import init_sampling_offsets, ms_deform_attn, softmax_fp32

Tensor = torch.Tensor


def _xavier(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


def _init_deformable(module: nn.Module, heads: int, groups: int, points: int) -> None:
    """BEVFormer's init of a deformable-attention block: directional sampling offsets, zero
    attention weights (uniform at start), Xavier value/output projections."""
    init_sampling_offsets(module.sampling_offsets, heads, groups, points)
    nn.init.zeros_(module.attention_weights.weight)
    nn.init.zeros_(module.attention_weights.bias)
    _xavier(module.value_proj)
    _xavier(module.output_proj)


class TemporalSelfAttention(nn.Module):
    """Deformable attention of each BEV query over ``[aligned previous BEV, current queries]``.

    Offsets and weights are predicted from ``cat(prev, query + pos)`` per query; each of the two
    "queue" entries is sampled around the query's own cell (the previous BEV is already aligned
    to the current ego frame, so no shift is needed); the two results are averaged.
    """

    queue = 2

    def __init__(self, dim: int, heads: int, points: int, dropout: float) -> None:
        super().__init__()
        self.dim, self.heads, self.points = dim, heads, points
        self.sampling_offsets = nn.Linear(2 * dim, heads * self.queue * points * 2)
        self.attention_weights = nn.Linear(2 * dim, heads * self.queue * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        _init_deformable(self, heads, self.queue, points)

    def forward(
        self,
        query: Tensor,  # (B, Q, D)
        pos: Tensor,  # (1 or B, Q, D)
        prev: Tensor | None,  # (B, Q, D) aligned previous BEV, or None
        prev_valid: Tensor | None,  # (B, Q, 1) bool: the previous BEV covers this cell
        ref: Tensor,  # (Q, 2) cell centres normalised as (y / Y, x / X) for grid_sample
        shape_xy: tuple[int, int],
    ) -> Tensor:
        b, q, d = query.shape
        xq, yq = shape_xy
        m, p = self.heads, self.points
        if prev is None:
            prev = query
        elif prev_valid is not None:
            prev = torch.where(prev_valid, prev, query)  # uncovered cells: the queries stand in
        q_in = torch.cat([prev, query + pos], dim=-1)  # (B, Q, 2D)
        value = self.value_proj(torch.stack([prev, query], 1))  # (B, 2, Q, D)
        value = value.reshape(b * 2, xq, yq, m, d // m).permute(0, 3, 4, 1, 2)  # (2B, M, Dh, X, Y)
        offsets = self.sampling_offsets(q_in).float().view(b, q, m, 2, 1, p, 2)  # fp32 positions
        offsets = offsets.permute(0, 3, 1, 2, 4, 5, 6).reshape(b * 2, q, m, 1, p, 2)
        norm = offsets.new_tensor([yq, xq])
        loc = ref.view(1, q, 1, 1, 1, 2).float() + offsets / norm  # (2B, Q, M, 1, P, 2)
        weights = softmax_fp32(self.attention_weights(q_in).view(b, q, m, 2, p), -1)
        weights = weights.permute(0, 3, 1, 2, 4).reshape(b * 2, q, m, 1, p)
        out = ms_deform_attn([value], loc, weights).to(query.dtype)  # (2B, Q, D)
        out = out.view(b, 2, q, d).mean(1)
        return query + self.dropout(self.output_proj(out))


class SpatialCrossAttention(nn.Module):
    """Each BEV query attends to the image features where its pillar projects.

    ``sca_points`` per head and level are split evenly over the pillar's ``Z`` heights; sampling
    positions are ``reference (per camera, per height) + offset / level size``. A point whose
    reference lies behind a camera or outside its image has weight 0 in that camera; each query
    averages over the cameras that see at least one of its pillar points (zero if none).

    Batched over cameras. With ``gather`` (default) each camera attends only for the queries it
    sees, padded to the largest such set (BEVFormer's rebatch: ~N times less work and memory;
    the size depends on the calibration, so ``torch.compile`` recompiles when it changes); without,
    every camera processes every query (static shapes; same result).
    """

    def __init__(self, dim: int, heads: int, levels: int, points: int, z_anchors: int, dropout: float,
                 gather: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.dim, self.heads, self.levels, self.points, self.z = dim, heads, levels, points, z_anchors
        self.gather = gather
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        _init_deformable(self, heads, levels, points)

    def forward(
        self,
        query: Tensor,  # (B, Q, D)
        pos: Tensor,  # (1 or B, Q, D)
        feats: list[Tensor],  # per level (B*N, D, H_l, W_l), camera + level embeddings added
        ref: Tensor,  # (B, N, Q, Z, 2) normalised (x, y) image positions of the pillar points
        visible: Tensor,  # (B, N, Q, Z) bool
    ) -> Tensor:
        b, q, d = query.shape
        n = ref.shape[1]
        m, lv, p, z = self.heads, self.levels, self.points, self.z
        pz = p // z
        values = []
        norms = []
        for f in feats:
            bn, _, h, w = f.shape
            v = nn.functional.conv2d(f, self.value_proj.weight[:, :, None, None], self.value_proj.bias)
            values.append(v.view(bn, m, d // m, h, w))
            norms.append((w, h))
        qp = query + pos
        offsets = self.sampling_offsets(qp).float()  # (B, Q, M*L*P*2), fp32 positions
        weights = softmax_fp32(self.attention_weights(qp).view(b, q, m, lv * p), -1).view(b, q, -1)
        seen = visible.any(-1)  # (B, N, Q)
        if self.gather:  # only the queries each camera sees (BEVFormer's "rebatch"), padded to K
            idx = visible_query_index(seen)  # (B, N, K)
            k = idx.shape[-1]

            def take(x: Tensor) -> Tensor:  # (B, Q, C) -> (B, N, K, C)
                c = x.shape[-1]
                return torch.gather(x.unsqueeze(1).expand(b, n, q, c), 2, idx.unsqueeze(-1).expand(b, n, k, c))

            offsets, weights = take(offsets), take(weights)
            ref = torch.gather(ref, 2, idx[..., None, None].expand(b, n, k, z, 2))
            visible = torch.gather(visible, 2, idx[..., None].expand(b, n, k, z))  # padding: all False
        else:
            k = q
            offsets, weights = offsets.unsqueeze(1), weights.unsqueeze(1)
        norm = offsets.new_tensor(norms).view(lv, 1, 1, 2)  # per level (W_l, H_l)
        loc = ref.view(b, n, k, 1, 1, 1, z, 2).float() + offsets.view(b, -1, k, m, lv, pz, z, 2) / norm
        loc = loc.reshape(b * n, k, m, lv, p, 2)  # (B*N, K, M, L, P, 2)
        weights = weights.view(b, -1, k, m, lv, pz, z) * visible.view(b, n, k, 1, 1, 1, z)
        weights = weights.reshape(b * n, k, m, lv, p)
        out = ms_deform_attn(values, loc, weights).view(b, n, k, d)  # invisible points add exactly 0
        if self.gather:
            flat = idx.reshape(b, n * k, 1).expand(b, n * k, d)
            out = out.new_zeros(b, q, d).scatter_add_(1, flat, out.reshape(b, n * k, d))
        else:
            out = out.sum(1)
        count = seen.sum(1).clamp(min=1).unsqueeze(-1)  # (B, Q, 1)
        out = (out / count).to(query.dtype)
        return query + self.dropout(self.output_proj(out))


def visible_query_index(seen: Tensor) -> Tensor:
    """``seen (B, N, Q)`` bool -> ``(B, N, K)`` indices of each camera's visible queries first (in
    query order), then unseen ones as padding; ``K`` = the largest visible count (at least 1)."""
    if seen.device.type == "meta":  # shapes only (parameter counting, shape tests)
        k = seen.shape[-1]
    else:
        k = max(int(seen.sum(-1).max()), 1)
    return torch.argsort((~seen).to(torch.int8), dim=-1, stable=True)[..., :k]


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, levels: int, sca_points: int, z_anchors: int,
                 tsa_points: int, ffn_dim: int, dropout: float, sca_gather: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.tsa = TemporalSelfAttention(dim, heads, tsa_points, dropout)
        self.sca = SpatialCrossAttention(dim, heads, levels, sca_points, z_anchors, dropout, sca_gather)
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, prev: Tensor | None, prev_valid: Tensor | None,
                tsa_ref: Tensor, shape_xy: tuple[int, int], feats: list[Tensor], sca_ref: Tensor,
                visible: Tensor) -> Tensor:  # fmt: skip
        x = self.norm1(self.tsa(x, pos, prev, prev_valid, tsa_ref, shape_xy))
        x = self.norm2(self.sca(x, pos, feats, sca_ref, visible))
        return self.norm3(self.ffn(x))


class BEVEncoder(nn.Module):
    def __init__(self, num_layers: int, grad_checkpoint: bool = False, **layer_kw: int | float) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(**layer_kw) for _ in range(num_layers)])  # type: ignore[arg-type]
        self.grad_checkpoint = grad_checkpoint

    def forward(self, x: Tensor, pos: Tensor, prev: Tensor | None, prev_valid: Tensor | None,
                tsa_ref: Tensor, shape_xy: tuple[int, int], feats: list[Tensor], sca_ref: Tensor,
                visible: Tensor) -> Tensor:  # fmt: skip
        for layer in self.layers:
            args = (x, pos, prev, prev_valid, tsa_ref, shape_xy, feats, sca_ref, visible)
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x
