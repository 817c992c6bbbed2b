"""Geometry against nuscenes-devkit's own math (pyquaternion, transform_matrix, view_points)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nuscenes.utils.geometry_utils import transform_matrix, view_points
from pyquaternion import Quaternion

from bevctl import geometry as geo
from bevctl.config import GRID_PRESETS, BEVGrid

RIG = json.loads((Path(__file__).resolve().parents[1] / "bevctl/assets/nuscenes_rig.json").read_text())


def _rig_cameras() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(quat wxyz, translation, intrinsic) per camera of the real nuScenes rig shipped with bevctl."""
    return [
        (np.array(c["rotation"]), np.array(c["translation"]), np.array(c["camera_intrinsic"]))
        for c in RIG["cameras"].values()
    ]


def _random_quat(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    return q / np.linalg.norm(q)


def test_quaternion_and_transform_match_devkit() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = _random_quat(rng)
        t = rng.normal(size=3) * 10
        ours = geo.transform_from_quat(torch.tensor(q), torch.tensor(t)).numpy()
        theirs = transform_matrix(t, Quaternion(q), inverse=False)
        np.testing.assert_allclose(ours, theirs, atol=1e-10)
        ours_inv = geo.invert_transform(torch.tensor(ours)).numpy()
        np.testing.assert_allclose(ours_inv, transform_matrix(t, Quaternion(q), inverse=True), atol=1e-9)


def test_projection_matches_view_points_on_real_rig() -> None:
    rng = np.random.default_rng(1)
    pts_ego = rng.uniform([-30, -15, -1], [30, 15, 3], size=(500, 3))
    for q, t, k in _rig_cameras():
        ours_uv, ours_depth = geo.ego_to_pixels(
            torch.tensor(k), geo.transform_from_quat(torch.tensor(q), torch.tensor(t)), torch.tensor(pts_ego)
        )
        cam_T_ego = transform_matrix(t, Quaternion(q), inverse=True)
        pts_cam = (cam_T_ego @ np.c_[pts_ego, np.ones(len(pts_ego))].T)[:3]
        theirs = view_points(pts_cam, k, normalize=True)[:2].T
        front = pts_cam[2] > 0.1
        np.testing.assert_allclose(ours_depth.numpy(), pts_cam[2], atol=1e-9)
        np.testing.assert_allclose(ours_uv.numpy()[front], theirs[front], rtol=1e-5, atol=1e-5)


def test_ground_rays_invert_projection_batched() -> None:
    """Ground points -> pixels (devkit math) -> rays -> ground again, for all cameras at once."""
    rng = np.random.default_rng(2)
    cams = _rig_cameras()
    quats = torch.tensor(np.stack([c[0] for c in cams]))
    trans = torch.tensor(np.stack([c[1] for c in cams]))
    ks = torch.tensor(np.stack([c[2] for c in cams]))
    ego_T_cam = geo.transform_from_quat(quats, trans)  # (N, 4, 4)
    ground = np.c_[rng.uniform(-30, 30, size=(400, 2)), np.zeros(400)]
    uv, depth = geo.ego_to_pixels(ks, ego_T_cam, torch.tensor(ground).expand(len(cams), -1, -1))
    visible = geo.in_image(uv, depth, 1600, 900)
    hit, valid = geo.rays_to_ground(ks, ego_T_cam, uv)
    assert visible.sum() > 100
    assert bool(valid[visible].all())
    expected = torch.tensor(ground).expand(len(cams), -1, -1)
    np.testing.assert_allclose(hit[visible].numpy(), expected[visible].numpy(), atol=1e-6)


def test_rays_above_horizon_are_invalid() -> None:
    q, t, k = _rig_cameras()[0]
    ego_T_cam = geo.transform_from_quat(torch.tensor(q), torch.tensor(t))
    uv = geo.pixel_grid(9, 16, scale_to=(900, 1600), dtype=torch.float64)
    _, valid = geo.rays_to_ground(torch.tensor(k), ego_T_cam, uv)
    rows = valid.reshape(9, 16)
    assert not bool(rows[0].any()), "top row looks at the sky"
    assert bool(rows[-1].all()), "bottom row looks at the ground"


def test_rays_to_ground_is_differentiable() -> None:
    q, t, k = _rig_cameras()[1]
    ego_T_cam = geo.transform_from_quat(torch.tensor(q), torch.tensor(t)).requires_grad_(True)
    uv = torch.tensor([[800.0, 700.0], [200.0, 850.0]], dtype=torch.float64)
    hit, valid = geo.rays_to_ground(torch.tensor(k), ego_T_cam, uv)
    assert bool(valid.all())
    hit.sum().backward()
    assert ego_T_cam.grad is not None and torch.isfinite(ego_T_cam.grad).all()


def test_pixel_grid_centres() -> None:
    uv = geo.pixel_grid(2, 4, scale_to=(4, 8))
    # label pixel (0, 0) covers image pixels 0..1 x 0..1 -> centre 0.5
    np.testing.assert_allclose(uv[0].numpy(), [0.5, 0.5])
    np.testing.assert_allclose(uv[-1].numpy(), [6.5, 2.5])
    assert torch.equal(geo.pixel_grid(3, 5), torch.stack(torch.meshgrid(
        torch.arange(5.0), torch.arange(3.0), indexing="xy"), -1).reshape(-1, 2))


def test_bev_grid_cells_round_trip() -> None:
    grid = GRID_PRESETS["hdmapnet"]
    assert grid.shape == (400, 200)
    centers = geo.bev_cell_centers(grid, dtype=torch.float64)
    ij = geo.ego_to_cell(grid, centers)
    np.testing.assert_allclose(ij[..., 0].numpy(), np.arange(400)[:, None] + 0.5 + 0 * ij[..., 1].numpy())
    np.testing.assert_allclose(geo.cell_to_ego(grid, ij).numpy(), centers.numpy(), atol=1e-9)
    # sampling a map at its own cell centres returns the map exactly
    bev = torch.randn(2, 3, *grid.shape, dtype=torch.float64)
    xy = centers.reshape(1, -1, 2).expand(2, -1, -1)
    sampled = geo.sample_bev(bev, grid, xy).reshape(2, 3, *grid.shape)
    torch.testing.assert_close(sampled, bev)


def _pose(yaw_deg: float, tx: float, ty: float) -> torch.Tensor:
    q = Quaternion(axis=[0, 0, 1], degrees=yaw_deg)
    return torch.tensor(transform_matrix([tx, ty, 0.0], q), dtype=torch.float64).unsqueeze(0)


def test_warp_pure_translation_moves_features_by_cells() -> None:
    grid = BEVGrid(-8, 8, -4, 4, 0.5)
    bev = torch.zeros(1, 1, *grid.shape, dtype=torch.float64)
    bev[0, 0, 20, 8] = 1.0  # cell centre x = 2.25, y = 0.25 in the source frame
    # destination ego is 2 m further forward: the feature appears 4 cells closer
    warped, valid = geo.warp_bev(bev, _pose(0, 100, 50), _pose(0, 102, 50), grid)
    assert warped[0, 0, 16, 8] == pytest.approx(1.0)
    assert warped.sum() == pytest.approx(1.0)
    assert not bool(valid[0, -4:].any()) and bool(valid[0, :-4].all())


def test_warp_pure_rotation_about_ego_origin() -> None:
    grid = BEVGrid(-8, 8, -8, 8, 0.5)
    bev = torch.zeros(1, 1, *grid.shape, dtype=torch.float64)
    i, j = 28, 16  # x = 6.25, y = 0.25: straight ahead
    bev[0, 0, i, j] = 1.0
    # destination ego turned 90 deg left: a point straight ahead of the source is now on the right
    warped, _ = geo.warp_bev(bev, _pose(0, 0, 0), _pose(90, 0, 0), grid, mode="nearest")
    ii, jj = np.unravel_index(int(warped[0, 0].argmax()), grid.shape)
    x, y = grid.x_min + (ii + 0.5) * 0.5, grid.y_min + (jj + 0.5) * 0.5
    assert (x, y) == pytest.approx((0.25, -6.25))


def test_warp_there_and_back_matches_inside_overlap() -> None:
    grid = BEVGrid(-16, 16, -8, 8, 0.25)
    # smooth field so bilinear resampling twice stays close
    c = geo.bev_cell_centers(grid, dtype=torch.float64)
    bev = torch.stack([torch.sin(c[..., 0] / 3) + torch.cos(c[..., 1] / 2), c[..., 0] * 0.1]).unsqueeze(0)
    a, b = _pose(10, 5, -3), _pose(25, 7.5, -1.0)
    fwd, valid_fwd = geo.warp_bev(bev, a, b, grid)
    back, valid_back = geo.warp_bev(fwd, b, a, grid)
    # cells whose round trip stayed inside both grids (with a one-cell margin for interpolation)
    # (the grid's own border counts as invalid: bilinear reads there mix in the zero padding)
    invalid = torch.nn.functional.pad((~valid_fwd).double().unsqueeze(1), (2, 2, 2, 2), value=1.0)
    inner = torch.nn.functional.max_pool2d(invalid, 5, 1, 0).squeeze(1) == 0
    back_valid_fwd, _ = geo.warp_bev(inner.double().unsqueeze(1), b, a, grid, mode="nearest")
    mask = valid_back & (back_valid_fwd[:, 0] > 0.5)
    assert mask.float().mean() > 0.4
    err = (back - bev).abs().amax(1)[mask]
    assert float(err.max()) < 0.02


def test_warp_is_differentiable() -> None:
    grid = GRID_PRESETS["demo"]
    bev = torch.randn(2, 4, *grid.shape, requires_grad=True)
    warped, _ = geo.warp_bev(bev, _pose(3, 1, 0).float().expand(2, -1, -1), _pose(0, 0, 0).float().expand(2, -1, -1), grid)
    warped.square().sum().backward()
    assert bev.grad is not None and bev.grad.abs().sum() > 0


def test_in_image_and_inside_grid_are_half_open() -> None:
    """``in_image``: in front of the camera and u in [0, W), v in [0, H); ``inside_grid``: x in
    [x_min, x_max), y in [y_min, y_max), like the grid's cells."""
    w, h = 8, 6
    uv = torch.tensor([[0.0, 0.0], [7.999, 5.999], [8.0, 1.0], [1.0, 6.0], [-1e-4, 1.0], [1.0, -1e-4], [3.0, 3.0],
                       [3.0, 3.0], [3.0, 3.0]])
    depth = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-5, 2e-5, -1.0])
    assert geo.in_image(uv, depth, w, h).tolist() == [True, True, False, False, False, False, False, True, False]
    grid = BEVGrid(-2.0, 4.0, -1.0, 3.0, 0.5)
    xy = torch.tensor([[-2.0, -1.0], [3.999, 2.999], [4.0, 0.0], [0.0, 3.0], [-2.001, 0.0], [0.0, -1.001]])
    assert geo.inside_grid(grid, xy).tolist() == [True, True, False, False, False, False]
    # the ego origin's cell, the grid's corners
    assert geo.ego_to_cell(grid, torch.tensor([-2.0, -1.0])).tolist() == [0.0, 0.0]
    assert geo.ego_to_cell(grid, torch.tensor([4.0, 3.0])).tolist() == [12.0, 8.0]
    assert geo.cell_to_ego(grid, torch.tensor([12.0, 8.0])).tolist() == [4.0, 3.0]
    assert geo.bev_cell_centers(grid)[0, 0].tolist() == [-1.75, -0.75]
    assert geo.bev_cell_centers(grid)[-1, -1].tolist() == [3.75, 2.75]


def test_projection_matrix_composes_intrinsics_and_the_inverse_extrinsics() -> None:
    """``pix_T_ego @ (p, 1) = (u d, v d, d, 1)`` for the pixel (u, v) and depth d of ego point p."""
    k = torch.tensor([[100.0, 0.0, 80.0], [0.0, 90.0, 45.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    ego_T_cam = geo.transform_from_quat(torch.tensor([0.5, -0.5, 0.5, -0.5], dtype=torch.float64),
                                        torch.tensor([1.5, 0.2, 1.6], dtype=torch.float64))
    pts = torch.tensor([[10.0, 1.0, 0.0], [5.0, -2.0, 0.5]], dtype=torch.float64)
    uv, depth = geo.ego_to_pixels(k, ego_T_cam, pts)
    m = geo.pix_T_ego(k, ego_T_cam)
    assert m.shape == (4, 4)
    hom = torch.cat([pts, torch.ones(2, 1, dtype=torch.float64)], -1) @ m.T
    torch.testing.assert_close(hom[:, :2], uv * depth[:, None])
    torch.testing.assert_close(hom[:, 2], depth)
    torch.testing.assert_close(hom[:, 3], torch.ones(2, dtype=torch.float64))
    assert geo.pix_T_cam_4x4(k.expand(2, 5, 3, 3)).shape == (2, 5, 4, 4)  # batched intrinsics stay batched
    k4 = geo.pix_T_cam_4x4(k)
    assert torch.equal(k4[:3, :3], k) and k4[3].tolist() == [0.0, 0.0, 0.0, 1.0] and k4[:3, 3].tolist() == [0.0] * 3


def test_yaw_transform_broadcasts_over_leading_dimensions() -> None:
    yaw = torch.tensor([[0.1, -0.7, 2.0], [0.0, 1.2, -3.0]], dtype=torch.float64)
    tx, ty = yaw * 3 + 1, yaw - 2
    batched = geo.yaw_transform(yaw, tx, ty)
    assert batched.shape == (2, 3, 4, 4)
    for i in range(2):
        for j in range(3):
            c, s = np.cos(float(yaw[i, j])), np.sin(float(yaw[i, j]))
            want = [[c, -s, 0, float(tx[i, j])], [s, c, 0, float(ty[i, j])], [0, 0, 1, 0], [0, 0, 0, 1]]
            np.testing.assert_allclose(batched[i, j].numpy(), want, atol=1e-12)


def _shift(dx: float, dy: float) -> torch.Tensor:
    return geo.yaw_transform(torch.zeros(1, dtype=torch.float64), torch.tensor([dx], dtype=torch.float64),
                             torch.tensor([dy], dtype=torch.float64))


def test_warp_valid_cells_are_those_between_the_outermost_source_centres() -> None:
    """Moving the ego by a tenth of a cell: the cells whose source point passes the outermost
    cell centre on that side (and only those) are invalid; nearest sampling then reads the
    source cell itself."""
    grid = BEVGrid(-2.0, 2.0, -1.0, 1.0, 0.5)  # 8 x 4 cells
    bev = torch.randn(1, 2, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eye = _shift(0.0, 0.0)
    same, valid = geo.warp_bev(bev, eye, eye, grid)  # no motion: every cell valid, up to the outermost centres
    assert bool(valid.all()) and torch.allclose(same, bev)
    for (dx, dy), bad in (((0.05, 0.0), (slice(7, 8), slice(None))), ((-0.05, 0.0), (slice(0, 1), slice(None))),
                          ((0.0, 0.05), (slice(None), slice(3, 4))), ((0.0, -0.05), (slice(None), slice(0, 1)))):
        warped, valid = geo.warp_bev(bev, eye, _shift(dx, dy), grid, mode="nearest")
        want = torch.ones(8, 4, dtype=torch.bool)
        want[bad] = False
        assert torch.equal(valid[0], want), (dx, dy)
        torch.testing.assert_close(warped[0][:, valid[0]], bev[0][:, valid[0]])  # nearest: the cell itself
        linear, _ = geo.warp_bev(bev, eye, _shift(dx, dy), grid)
        assert not torch.allclose(linear[0][:, valid[0]], bev[0][:, valid[0]])  # bilinear mixes neighbours


def test_quaternion_of_any_length_gives_the_same_rotation() -> None:
    """nuScenes stores rotations rounded, not exactly unit: any positive multiple of a quaternion
    is the same rotation, and the matrix stays orthonormal."""
    q = torch.tensor(_random_quat(np.random.default_rng(3)), dtype=torch.float64)
    r = geo.quat_to_rotmat(q)
    for scale in (0.999, 2.0, 10.0):
        rs = geo.quat_to_rotmat(q * scale)
        torch.testing.assert_close(rs, r)
        torch.testing.assert_close(rs @ rs.T, torch.eye(3, dtype=torch.float64))


def test_make_transform_broadcasts_rotations_and_translations() -> None:
    rots = geo.quat_to_rotmat(torch.tensor(np.stack([_random_quat(np.random.default_rng(i)) for i in range(2)])))
    t = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    one_t = geo.make_transform(rots, t)  # two rotations, one translation
    assert one_t.shape == (2, 4, 4)
    for i in range(2):
        torch.testing.assert_close(one_t[i, :3, :3], rots[i])
        torch.testing.assert_close(one_t[i, :3, 3], t)
        assert one_t[i, 3].tolist() == [0.0, 0.0, 0.0, 1.0]
    ts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0]], dtype=torch.float64)
    one_r = geo.make_transform(rots[0], ts)  # one rotation, two translations
    assert one_r.shape == (2, 4, 4)
    torch.testing.assert_close(one_r[:, :3, 3], ts)
    torch.testing.assert_close(one_r[1, :3, :3], rots[0])


def test_points_close_in_front_of_a_camera_project_exactly() -> None:
    """A point 0.5 m in front of the camera (still in front: depth > eps) projects to
    K @ p / depth, for camera-frame and ego-frame points alike."""
    k = torch.tensor([[100.0, 0.0, 50.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[0.1, -0.05, 0.5]], dtype=torch.float64)
    uv, depth = geo.cam_to_pixels(k, p)
    torch.testing.assert_close(uv, torch.tensor([[100.0 * 0.2 + 50.0, 100.0 * -0.1 + 40.0]], dtype=torch.float64))
    assert depth.tolist() == [0.5]
    ego_T_cam = geo.make_transform(torch.eye(3, dtype=torch.float64), torch.tensor([3.0, 1.0, 1.5], dtype=torch.float64))
    uv2, depth2 = geo.ego_to_pixels(k, ego_T_cam, p + ego_T_cam[:3, 3])
    torch.testing.assert_close(uv2, uv)
    torch.testing.assert_close(depth2, depth)


def _downward_camera(height: float, x: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A camera at ego (x, 0, height) looking straight down (optical z = ego -z), 100 px focal."""
    k = torch.tensor([[100.0, 0.0, 50.0], [0.0, 100.0, 50.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    rot = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)  # det +1
    return k, geo.make_transform(rot, torch.tensor([x, 0.0, height], dtype=torch.float64))


def test_rays_of_a_low_camera_far_from_the_ego_origin_hit_the_ground_below_it() -> None:
    """A camera 0.5 m above the ground (hits nearer than 1 m along the ray) and 40 m from the ego
    origin: the principal ray hits the ground right below it, and max_range is measured from the
    camera, not from the ego origin."""
    k, ego_T_cam = _downward_camera(0.5, 40.0)
    uv = torch.tensor([[50.0, 50.0], [150.0, 50.0]], dtype=torch.float64)  # centre; 1 focal length off-axis
    pts, valid = geo.rays_to_ground(k, ego_T_cam, uv, max_range=5.0)
    assert valid.tolist() == [True, True]
    torch.testing.assert_close(pts[0], torch.tensor([40.0, 0.0, 0.0], dtype=torch.float64))
    assert float((pts[1, :2] - torch.tensor([40.0, 0.0], dtype=torch.float64)).norm()) == pytest.approx(0.5)
    _, valid = geo.rays_to_ground(k, ego_T_cam, uv, max_range=0.25)
    assert valid.tolist() == [True, False]


def test_sample_bev_reads_a_map_of_any_dtype_at_float32_points() -> None:
    """A float64 (or bfloat16) BEV map sampled at float32 ego points (as the ray grids store
    them): each cell centre reads its cell, outside the grid reads 0."""
    grid = BEVGrid(-2.0, 2.0, -1.0, 1.0, 0.5)
    bev = torch.arange(grid.nx * grid.ny, dtype=torch.float64).view(1, 1, grid.nx, grid.ny)
    centres = geo.bev_cell_centers(grid).reshape(1, -1, 2)  # float32
    pts = torch.cat([centres, torch.tensor([[[5.0, 0.0]]])], dim=1)
    for dtype in (torch.float64, torch.bfloat16):
        out = geo.sample_bev(bev.to(dtype), grid, pts)
        assert out.dtype == dtype
        torch.testing.assert_close(out[0, 0, :-1].double(), bev.to(dtype).reshape(-1).double())
        assert float(out[0, 0, -1]) == 0.0
