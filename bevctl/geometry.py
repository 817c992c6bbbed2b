"""Frames and projections: batched, differentiable torch functions.

Conventions (nuScenes):
- ego frame: x forward, y left, z up, origin on the ground under the rear axle.
- camera (optical) frame: x right, y down, z forward.
- ``a_T_b`` is a ``(..., 4, 4)`` homogeneous transform mapping points in frame b to frame a;
  ``pix_T_cam`` is the ``(..., 3, 3)`` intrinsic matrix.
- Points are ``(..., N, 3)``; pixels ``(..., N, 2)`` as ``(u, v)`` = (column, row). As in
  OpenCV and nuScenes intrinsics, pixel centres sit at integer coordinates: pixel ``(r, c)``
  is the point ``u = c, v = r`` (see :func:`pixel_grid`).
- BEV tensors are ``(B, C, X, Y)`` on a :class:`~bevctl.config.BEVGrid`.

All leading dimensions broadcast, so the same call serves ``(B, N_cams, ...)`` batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bevctl.config import BEVGrid

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# Rotations and rigid transforms
# --------------------------------------------------------------------------------------------


def quat_to_rotmat(q_wxyz: Tensor) -> Tensor:
    """Unit quaternion ``(..., 4)`` as ``[w, x, y, z]`` -> rotation matrix ``(..., 3, 3)``."""
    q = q_wxyz / q_wxyz.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def make_transform(rot: Tensor, trans: Tensor) -> Tensor:
    """Rotation ``(..., 3, 3)`` and translation ``(..., 3)`` -> ``(..., 4, 4)``."""
    batch = torch.broadcast_shapes(rot.shape[:-2], trans.shape[:-1])
    out = torch.zeros(*batch, 4, 4, dtype=rot.dtype, device=rot.device)
    out[..., :3, :3] = rot
    out[..., :3, 3] = trans
    out[..., 3, 3] = 1.0
    return out


def transform_from_quat(q_wxyz: Tensor, trans: Tensor) -> Tensor:
    """nuScenes ``rotation`` + ``translation`` record -> ``a_T_b`` ``(..., 4, 4)``."""
    return make_transform(quat_to_rotmat(q_wxyz), trans)


def invert_transform(a_T_b: Tensor) -> Tensor:
    """``a_T_b`` -> ``b_T_a`` for rigid transforms (exact, no general matrix inverse)."""
    rot = a_T_b[..., :3, :3]
    trans = a_T_b[..., :3, 3]
    rot_inv = rot.transpose(-1, -2)
    return make_transform(rot_inv, -(rot_inv @ trans.unsqueeze(-1)).squeeze(-1))


def yaw_transform(yaw: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """A planar pose (rotation about z by ``yaw``, translation ``(tx, ty, 0)``) -> ``(..., 4, 4)``."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    rot = torch.stack([c, -s, zero, s, c, zero, zero, zero, one], dim=-1).reshape(*yaw.shape, 3, 3)
    return make_transform(rot, torch.stack([tx, ty, zero], dim=-1))


def transform_points(a_T_b: Tensor, pts_b: Tensor) -> Tensor:
    """Apply ``a_T_b (..., 4, 4)`` to points ``(..., N, 3)`` in frame b -> ``(..., N, 3)`` in a."""
    rot = a_T_b[..., :3, :3]
    trans = a_T_b[..., :3, 3]
    return pts_b @ rot.transpose(-1, -2) + trans.unsqueeze(-2)


def pix_T_cam_4x4(pix_T_cam: Tensor) -> Tensor:
    """Intrinsics ``(..., 3, 3)`` -> ``(..., 4, 4)`` so they compose with rigid transforms."""
    out = torch.zeros(*pix_T_cam.shape[:-2], 4, 4, dtype=pix_T_cam.dtype, device=pix_T_cam.device)
    out[..., :3, :3] = pix_T_cam
    out[..., 3, 3] = 1.0
    return out


def pix_T_ego(pix_T_cam: Tensor, ego_T_cam: Tensor) -> Tensor:
    """Projection matrix ``(..., 4, 4)``: ego point -> homogeneous ``(u*d, v*d, d, 1)``."""
    return pix_T_cam_4x4(pix_T_cam) @ invert_transform(ego_T_cam)


# --------------------------------------------------------------------------------------------
# Camera <-> pixel
# --------------------------------------------------------------------------------------------


def cam_to_pixels(pix_T_cam: Tensor, pts_cam: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Project camera-frame points ``(..., N, 3)`` -> pixels ``(..., N, 2)`` and depth ``(..., N)``.

    Pixels of points with depth <= ``eps`` are meaningless; callers mask with ``depth > eps``.
    The division uses a clamped depth so gradients stay finite.
    """
    depth = pts_cam[..., 2]
    proj = pts_cam @ pix_T_cam.transpose(-1, -2)  # (..., N, 3)
    safe = depth.clamp(min=eps).unsqueeze(-1)
    return proj[..., :2] / safe, depth


def ego_to_pixels(
    pix_T_cam: Tensor, ego_T_cam: Tensor, pts_ego: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Ego points ``(..., N, 3)`` -> pixels ``(..., N, 2)`` and depth ``(..., N)`` in that camera."""
    pts_cam = transform_points(invert_transform(ego_T_cam), pts_ego)
    return cam_to_pixels(pix_T_cam, pts_cam, eps)


def in_image(uv: Tensor, depth: Tensor, width: int, height: int, eps: float = 1e-5) -> Tensor:
    """``(..., N)`` bool: in front of the camera and inside ``[0, width) x [0, height)``."""
    u, v = uv[..., 0], uv[..., 1]
    return (depth > eps) & (u >= 0) & (u < width) & (v >= 0) & (v < height)


def pixels_to_rays(pix_T_cam: Tensor, uv: Tensor) -> Tensor:
    """Pixels ``(..., N, 2)`` -> un-normalised ray directions ``(..., N, 3)`` in the camera frame (z = 1)."""
    ones = torch.ones_like(uv[..., :1])
    uv1 = torch.cat([uv, ones], dim=-1)
    return uv1 @ torch.linalg.inv(pix_T_cam).transpose(-1, -2)


def pixel_grid(height: int, width: int, scale_to: tuple[int, int] | None = None, *,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Pixel-centre coordinates ``(H*W, 2)`` as ``(u, v)`` for an ``height x width`` label map.

    When the label map is a resized version of an image of size ``scale_to = (H_img, W_img)``,
    each label pixel's centre is expressed in that image's pixel coordinates (the coordinates
    ``pix_T_cam`` expects). nuScenes intrinsics put pixel centres at integer coordinates, so the
    centre of label pixel ``(r, c)`` is at ``u = (c + 0.5) * W_img / W - 0.5``.
    """
    h_img, w_img = scale_to if scale_to is not None else (height, width)
    rows = (torch.arange(height, dtype=dtype, device=device) + 0.5) * (h_img / height) - 0.5
    cols = (torch.arange(width, dtype=dtype, device=device) + 0.5) * (w_img / width) - 0.5
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([u, v], dim=-1).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# Ground plane
# --------------------------------------------------------------------------------------------


def rays_to_ground(
    pix_T_cam: Tensor, ego_T_cam: Tensor, uv: Tensor, max_range: float = 1e3
) -> tuple[Tensor, Tensor]:
    """Cast pixel rays onto the ground plane z = 0 of the ego frame.

    pix_T_cam: ``(..., 3, 3)``; ego_T_cam: ``(..., 4, 4)``; uv: ``(..., N, 2)``.
    Returns ego points ``(..., N, 3)`` (z = 0 where valid) and ``valid (..., N)``: the ray
    points downwards and hits the plane in front of the camera within ``max_range`` metres.
    Invalid points are finite but meaningless.
    """
    dirs_cam = pixels_to_rays(pix_T_cam, uv)  # (..., N, 3)
    rot = ego_T_cam[..., :3, :3]
    origin = ego_T_cam[..., :3, 3].unsqueeze(-2)  # (..., 1, 3)
    dirs_ego = dirs_cam @ rot.transpose(-1, -2)  # (..., N, 3)
    dz = dirs_ego[..., 2]
    valid = dz < -1e-6
    safe_dz = torch.where(valid, dz, torch.full_like(dz, -1.0))
    t = -origin[..., 2] / safe_dz  # (..., N); origin z > 0 above ground
    valid = valid & (t > 0)
    pts = origin + t.unsqueeze(-1) * dirs_ego
    dist = (pts[..., :2] - origin[..., :2]).norm(dim=-1)
    valid = valid & (dist < max_range)
    pts = torch.where(valid.unsqueeze(-1), pts, torch.zeros_like(pts))
    return pts, valid


# --------------------------------------------------------------------------------------------
# BEV grid
# --------------------------------------------------------------------------------------------


def bev_cell_centers(grid: BEVGrid, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> Tensor:
    """Ego ``(x, y)`` of every cell centre, ``(X, Y, 2)``."""
    xs = grid.x_min + (torch.arange(grid.nx, dtype=dtype, device=device) + 0.5) * grid.resolution
    ys = grid.y_min + (torch.arange(grid.ny, dtype=dtype, device=device) + 0.5) * grid.resolution
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def ego_to_cell(grid: BEVGrid, xy: Tensor) -> Tensor:
    """Ego ``(..., 2)`` -> continuous cell coordinates ``(..., 2)`` as ``(i, j)``.

    ``floor`` gives the integer cell index; cell ``(i, j)``'s centre maps to ``(i + 0.5, j + 0.5)``.
    """
    i = (xy[..., 0] - grid.x_min) / grid.resolution
    j = (xy[..., 1] - grid.y_min) / grid.resolution
    return torch.stack([i, j], dim=-1)


def cell_to_ego(grid: BEVGrid, ij: Tensor) -> Tensor:
    """Inverse of :func:`ego_to_cell`."""
    x = grid.x_min + ij[..., 0] * grid.resolution
    y = grid.y_min + ij[..., 1] * grid.resolution
    return torch.stack([x, y], dim=-1)


def ego_to_grid_sample(grid: BEVGrid, xy: Tensor) -> Tensor:
    """Ego ``(..., 2)`` -> normalised coordinates for ``F.grid_sample`` on a ``(B, C, X, Y)`` map
    with ``align_corners=False``. grid_sample's last dim is ``(w, h)`` = ``(Y index, X index)``."""
    nx = (xy[..., 0] - grid.x_min) / (grid.x_max - grid.x_min) * 2 - 1
    ny = (xy[..., 1] - grid.y_min) / (grid.y_max - grid.y_min) * 2 - 1
    return torch.stack([ny, nx], dim=-1)


def inside_grid(grid: BEVGrid, xy: Tensor) -> Tensor:
    """``(...)`` bool: the ego point lies inside the grid's extent."""
    x, y = xy[..., 0], xy[..., 1]
    return (x >= grid.x_min) & (x < grid.x_max) & (y >= grid.y_min) & (y < grid.y_max)


def sample_bev(bev: Tensor, grid: BEVGrid, xy: Tensor, mode: str = "bilinear") -> Tensor:
    """Sample a BEV map ``(B, C, X, Y)`` at ego points ``(B, N, 2)`` -> ``(B, C, N)``.

    Differentiable in ``bev`` (and in ``xy`` for bilinear). Points outside the grid read 0.
    """
    g = ego_to_grid_sample(grid, xy).to(bev.dtype).unsqueeze(1)  # (B, 1, N, 2)
    out = F.grid_sample(bev, g, mode=mode, padding_mode="zeros", align_corners=False)
    return out.squeeze(2)


def warp_bev(
    bev_src: Tensor,
    global_T_src: Tensor,
    global_T_dst: Tensor,
    grid: BEVGrid,
    mode: str = "bilinear",
) -> tuple[Tensor, Tensor]:
    """Resample a BEV map from one ego frame into another, exactly (full SE(3) poses).

    bev_src: ``(B, C, X, Y)`` in the ``src`` ego frame; ``global_T_src``, ``global_T_dst``:
    ``(B, 4, 4)`` ego poses. Every destination cell centre (on the ground, z = 0) is mapped to
    the source frame and the source map is sampled there. Returns the warped map
    ``(B, C, X, Y)`` in the ``dst`` frame and ``valid (B, X, Y)`` (the source point lies in the
    source grid, between the outermost cell centres, so bilinear reads never mix in the zero
    padding). Differentiable in ``bev_src``.
    """
    b = bev_src.shape[0]
    centers = bev_cell_centers(grid, dtype=global_T_dst.dtype, device=bev_src.device)  # (X, Y, 2)
    pts_dst = torch.cat([centers, torch.zeros_like(centers[..., :1])], dim=-1).reshape(1, -1, 3)
    src_T_dst = invert_transform(global_T_src) @ global_T_dst  # (B, 4, 4)
    pts_src = transform_points(src_T_dst, pts_dst.expand(b, -1, -1))[..., :2]  # (B, XY, 2)
    warped = sample_bev(bev_src, grid, pts_src, mode=mode).reshape(b, -1, grid.nx, grid.ny)
    half = grid.resolution / 2
    x, y = pts_src[..., 0], pts_src[..., 1]
    valid = (
        (x >= grid.x_min + half) & (x <= grid.x_max - half) & (y >= grid.y_min + half) & (y <= grid.y_max - half)
    ).reshape(b, grid.nx, grid.ny)
    return warped, valid
