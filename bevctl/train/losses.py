"""Training losses: reprojection (image pseudo-labels), temporal consistency, supervised BEV.

Reprojection loss
    Every label pixel of every camera casts its ray onto the ground plane z = 0 of the ego
    frame (:func:`bevctl.geometry.rays_to_ground`); the hit is a point of the BEV grid, where
    the BEV logits are sampled bilinearly (``grid_sample``, differentiable in the logits) and
    scored with cross-entropy against the pixel's pseudo-label (already mapped to BEV ids:
    0 background, k+1 class k, 255 ignore). Ignored: rays that miss the ground (above the
    horizon, behind the camera, > ``max_range``), hits outside the BEV grid, ignore-class pixels
    (sky, vehicles, ... per the label map) and, optionally, pixels below a confidence threshold.
    The ray hits depend only on the rig (intrinsics, extrinsics, label resolution) so they are
    computed once per rig and cached (:class:`RayGridCache`); rigs repeat across a dataset.
    Cameras fire at their own timestamps: the hits are computed on the ground of the camera's
    own ego pose (static calibration: cacheable) and then moved into the sample's ego frame.

    Normalisation: the loss is the mean over valid pixels **per sample**, then the mean over
    the samples of the batch (a sample without any valid pixel adds 0). Per-sample
    normalisation makes the loss of a batch independent of how it is split across DDP ranks.

Temporal loss
    The previous frame's BEV class probabilities ``q`` are warped into the current ego frame
    with both ego poses (:func:`bevctl.geometry.warp_bev`, exact SE(3), bilinear on
    probabilities). The divergence is ``KL(q_warped || p_t)`` per cell, summed over classes,
    averaged over cells that the previous grid fully covers (a warped all-ones map equals 1,
    so cells at the overlap's edge that bilinear sampling mixes with padding are excluded).
    ``q`` is **detached** (the previous frame is a fixed target; gradients flow only into the
    current prediction), unless ``detach_prev=False``. High weights over-smooth: agreement is
    cheapest where both frames predict blurry, low-contrast maps, so thin markings fade. The
    trainer logs the mean prediction entropy and the predicted foreground fraction to expose it.

Supervised loss
    Cross-entropy on the BEV GT (255 = ignore) with optional class weights, plus an optional
    soft Dice term over the foreground classes. Same per-sample normalisation.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bevctl import geometry
from bevctl.config import BEVGrid

Tensor = torch.Tensor
IGNORE = 255


# --------------------------------------------------------------------------------------------
# Ray hits on the ground, per rig
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayGrid:
    """Where every label pixel of every camera lands on the ground.

    xy: ``(N, P, 2)`` ego points (``P = h * w`` label pixels in row-major order);
    valid: ``(N, P)`` bool: the ray hits the ground inside the BEV grid;
    hit: ``(N, P)`` bool: the ray hits the ground (anywhere); None when not kept.
    """

    xy: Tensor
    valid: Tensor
    hit: Tensor | None = None


def compute_ray_grid(
    pix_T_cam: Tensor,
    ego_T_cam: Tensor,
    label_hw: tuple[int, int],
    image_hw: tuple[int, int],
    grid: BEVGrid,
    max_range: float = 1e3,
) -> RayGrid:
    """Ground hits of the label pixels of one rig.

    pix_T_cam ``(N, 3, 3)`` are the intrinsics for images of size ``image_hw``; the label maps
    are ``label_hw`` (any resolution: each label pixel's centre is mapped to image pixels).
    """
    pix = pix_T_cam.to(torch.float64)
    ego = ego_T_cam.to(torch.float64)
    uv = geometry.pixel_grid(*label_hw, scale_to=image_hw, dtype=torch.float64, device=pix.device)
    uv = uv.unsqueeze(0).expand(pix.shape[0], -1, -1)  # (N, P, 2)
    pts, hit = geometry.rays_to_ground(pix, ego, uv, max_range=max_range)
    xy = pts[..., :2]
    valid = hit & geometry.inside_grid(grid, xy)
    return RayGrid(xy=xy.to(torch.float32), valid=valid, hit=hit)


def move_ray_grid(rays: RayGrid, dst_T_src: Tensor, grid: BEVGrid) -> RayGrid:
    """Ground hits computed in one ego frame (a camera's own, at its timestamp) expressed in
    another (the sample's): ``dst_T_src (N, 4, 4)``. Exact for motion on the ground plane."""
    m = dst_T_src.to(rays.xy)  # the hits lie on z = 0: only the x, y rows and columns act
    xy = torch.baddbmm(m[:, None, :2, 3], rays.xy, m[:, :2, :2].transpose(1, 2))  # (N, P, 2)
    hit = rays.hit if rays.hit is not None else rays.valid
    return RayGrid(xy=xy, valid=hit & geometry.inside_grid(grid, xy), hit=hit)


def rig_key(pix_T_cam: Tensor, ego_T_cam: Tensor, label_hw: tuple[int, int],
            image_hw: tuple[int, int]) -> str:
    """A hash of one rig's matrices (rounded to 1e-6) and resolutions."""
    h = hashlib.blake2b(digest_size=16)
    for t in (pix_T_cam, ego_T_cam):
        h.update(torch.round(t.detach().to("cpu", torch.float64) * 1e6).to(torch.int64).numpy().tobytes())
    h.update(repr((tuple(label_hw), tuple(image_hw))).encode())
    return h.hexdigest()


class RayGridCache:
    """LRU cache of :class:`RayGrid` per rig (a nuScenes log reuses one calibration)."""

    def __init__(self, grid: BEVGrid, max_entries: int = 64, max_range: float = 1e3) -> None:
        self.grid = grid
        self.max_entries = max_entries
        self.max_range = max_range
        self._cache: OrderedDict[str, RayGrid] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, pix_T_cam: Tensor, ego_T_cam: Tensor, label_hw: tuple[int, int],
            image_hw: tuple[int, int]) -> RayGrid:
        key = rig_key(pix_T_cam, ego_T_cam, label_hw, image_hw) + str(pix_T_cam.device)
        found = self._cache.get(key)
        if found is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return found
        self.misses += 1
        rg = compute_ray_grid(pix_T_cam, ego_T_cam, label_hw, image_hw, self.grid, self.max_range)
        self._cache[key] = rg
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return rg

    def batch(self, pix_T_cam: Tensor, ego_T_cam: Tensor, label_hw: tuple[int, int],
              image_hw: tuple[int, int], sample_T_camego: Tensor | None = None) -> RayGrid:
        """Batched rigs ``(B, N, 3, 3)``, ``(B, N, 4, 4)`` -> RayGrid with ``(B, N, P, ...)``.

        With ``sample_T_camego (B, N, 4, 4)``, ``ego_T_cam`` is the static calibration (cached)
        and each camera's hits are moved from its own ego frame into the sample's."""
        parts = []
        for b in range(pix_T_cam.shape[0]):
            rg = self.get(pix_T_cam[b], ego_T_cam[b], label_hw, image_hw)
            if sample_T_camego is not None:
                rg = move_ray_grid(rg, sample_T_camego[b], self.grid)
            parts.append(rg)
        return RayGrid(xy=torch.stack([p.xy for p in parts]), valid=torch.stack([p.valid for p in parts]))


# --------------------------------------------------------------------------------------------
# Reprojection loss
# --------------------------------------------------------------------------------------------


def _per_sample_mean(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """values, mask ``(B, M)`` -> mean over the B samples of the per-sample masked mean (a
    sample with nothing valid counts as 0, so the batch mean splits exactly across DDP ranks),
    and the number of samples with any valid entry. Nothing valid gives a zero that still has
    a gradient path (so DDP sees every parameter)."""
    maskf = mask.to(values.dtype)
    count = maskf.sum(dim=1)  # (B,)
    per_sample = (values * maskf).sum(dim=1) / count.clamp(min=1)
    return per_sample.mean(), (count > 0).sum()


def reproject_logits(bev_logits: Tensor, grid: BEVGrid, rays: RayGrid) -> Tensor:
    """Sample BEV logits ``(B, C, X, Y)`` at every ray hit -> ``(B, C, N, P)``."""
    b, c = bev_logits.shape[:2]
    n, p = rays.xy.shape[1:3]
    sampled = geometry.sample_bev(bev_logits, grid, rays.xy.reshape(b, n * p, 2))  # (B, C, N*P)
    return sampled.reshape(b, c, n, p)


def reprojection_loss(
    bev_logits: Tensor,
    labels: Tensor,
    rays: RayGrid,
    grid: BEVGrid,
    *,
    confidence: Tensor | None = None,
    min_confidence: float = 0.0,
    class_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy between reprojected BEV logits and image pseudo-labels.

    bev_logits ``(B, C, X, Y)``; labels ``(B, N, h, w)`` integer BEV ids (255 ignore);
    rays: from :meth:`RayGridCache.batch` for label size ``(h, w)``; confidence ``(B, N, h, w)``
    in [0, 1] (optional). Returns the loss and stats (fraction of valid pixels).
    """
    b, c = bev_logits.shape[:2]
    n = labels.shape[1]
    target = labels.reshape(b, n, -1).long()  # (B, N, P)
    valid = rays.valid & (target != IGNORE) & (target < c)
    if confidence is not None and min_confidence > 0:
        valid = valid & (confidence.reshape(b, n, -1) >= min_confidence)
    # Only the valid pixels are sampled (most rays miss the grid or are ignored: ~80% on the
    # demo rig), per sample: the per-sample mean of their (weighted) cross-entropy.
    xy = rays.xy.reshape(b, -1, 2)
    per_sample = []
    for i, keep in enumerate(valid.reshape(b, -1)):
        idx = keep.nonzero(as_tuple=True)[0]  # (K,)
        if idx.numel() == 0:  # counts as 0, with a gradient path (so DDP sees every parameter)
            per_sample.append(bev_logits[i].float().sum() * 0.0)
            continue
        sampled = geometry.sample_bev(bev_logits[i:i + 1].float(), grid, xy[i, idx][None])[0]  # (C, K)
        tgt = target[i].reshape(-1)[idx]
        ce = -torch.log_softmax(sampled, dim=0).gather(0, tgt[None])[0]  # (K,) cross-entropy
        if class_weights is not None:
            ce = ce * class_weights.to(ce)[tgt]
        per_sample.append(ce.mean())
    loss = torch.stack(per_sample).mean()
    return loss, {"reproj_valid_frac": float(valid.float().mean())}


# --------------------------------------------------------------------------------------------
# Temporal loss
# --------------------------------------------------------------------------------------------


def temporal_loss(
    logits_cur: Tensor,
    logits_prev: Tensor,
    global_T_cur: Tensor,
    global_T_prev: Tensor,
    grid: BEVGrid,
    *,
    has_prev: Tensor | None = None,
    detach_prev: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """``KL(q_prev->cur || p_cur)`` inside the overlap (see the module docstring).

    logits_cur, logits_prev ``(B, C, X, Y)``; global_T_cur, global_T_prev ``(B, 4, 4)``;
    has_prev ``(B,)`` bool: samples without a previous frame contribute nothing.
    """
    b, c = logits_cur.shape[:2]
    q = torch.softmax(logits_prev.float(), dim=1)
    if detach_prev:
        q = q.detach()
    ones = torch.ones_like(q[:, :1])
    warped, _ = geometry.warp_bev(torch.cat([q, ones], dim=1), global_T_prev.float(),
                                  global_T_cur.float(), grid)
    q_w, cover = warped[:, :c], warped[:, c]
    mask = cover > 0.999  # (B, X, Y)
    if has_prev is not None:
        mask = mask & has_prev.view(b, 1, 1)
    q_w = q_w / q_w.sum(dim=1, keepdim=True).clamp(min=1e-6)
    log_p = torch.log_softmax(logits_cur.float(), dim=1)
    kl = (q_w * (torch.log(q_w.clamp(min=1e-8)) - log_p)).sum(dim=1)  # (B, X, Y)
    loss, _ = _per_sample_mean(kl.reshape(b, -1), mask.reshape(b, -1))
    return loss, {"temporal_overlap_frac": float(mask.float().mean())}


# --------------------------------------------------------------------------------------------
# Supervised BEV loss
# --------------------------------------------------------------------------------------------


def supervised_loss(
    bev_logits: Tensor,
    target: Tensor,
    *,
    class_weights: Tensor | None = None,
    dice_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy (+ ``dice_weight`` x soft Dice over foreground classes) vs BEV GT.

    bev_logits ``(B, C, X, Y)``; target ``(B, X, Y)`` integer ids, 255 = ignore.
    """
    b, c = bev_logits.shape[:2]
    logits = bev_logits.float()
    tgt = target.long()
    valid = (tgt != IGNORE) & (tgt < c)
    safe = torch.where(valid, tgt, torch.zeros_like(tgt))
    ce = F.cross_entropy(logits, safe, reduction="none")  # (B, X, Y)
    if class_weights is not None:
        ce = ce * class_weights.to(ce)[safe]
    loss, _ = _per_sample_mean(ce.reshape(b, -1), valid.reshape(b, -1))
    stats = {"ce": float(loss.detach())}
    if dice_weight > 0:
        d = dice_loss(logits, safe, valid)
        stats["dice"] = float(d.detach())
        loss = loss + dice_weight * d
    return loss, stats


def dice_loss(logits: Tensor, target: Tensor, valid: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice, per sample and foreground class, averaged. logits ``(B, C, X, Y)``."""
    c = logits.shape[1]
    prob = torch.softmax(logits, dim=1)[:, 1:]  # (B, C-1, X, Y)
    onehot = F.one_hot(target, c).permute(0, 3, 1, 2)[:, 1:].to(prob.dtype)
    m = valid.unsqueeze(1).to(prob.dtype)
    inter = (prob * onehot * m).sum(dim=(2, 3))
    denom = ((prob + onehot) * m).sum(dim=(2, 3))
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def prediction_stats(bev_logits: Tensor) -> dict[str, float]:
    """Mean per-cell entropy (nats) and foreground fraction of the argmax: over-smoothing shows
    as rising entropy and a foreground fraction collapsing towards 0."""
    logp = torch.log_softmax(bev_logits.float(), dim=1)
    ent = -(logp.exp() * logp).sum(dim=1).mean()
    fg = (bev_logits.argmax(dim=1) > 0).float().mean()
    return {"pred_entropy": float(ent), "pred_fg_frac": float(fg)}
