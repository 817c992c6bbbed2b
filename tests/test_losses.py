"""Losses on synthetic tensors with the real nuScenes rig (no data layer needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bevctl import geometry
from bevctl.config import BEVGrid, GRID_PRESETS
from bevctl.data.records import CAMERAS
from bevctl.train import losses

RIG = Path(__file__).resolve().parents[1] / "bevctl" / "assets" / "nuscenes_rig.json"
GRID = GRID_PRESETS["demo"]
IMAGE_HW = (90, 160)  # the 1600x900 rig scaled by 1/10


def _rig() -> tuple[torch.Tensor, torch.Tensor]:
    """(6, 3, 3) intrinsics for IMAGE_HW and (6, 4, 4) ego_T_cam of the real rig."""
    data = json.loads(RIG.read_text())["cameras"]
    pix, ego = [], []
    s = IMAGE_HW[1] / 1600
    scale = torch.tensor([[s, 0, 0.5 * s - 0.5], [0, s, 0.5 * s - 0.5], [0, 0, 1]], dtype=torch.float64)
    for cam in CAMERAS:
        c = data[cam]
        k = torch.tensor(c["camera_intrinsic"], dtype=torch.float64)
        pix.append(scale @ k)
        ego.append(geometry.transform_from_quat(torch.tensor(c["rotation"], dtype=torch.float64),
                                                torch.tensor(c["translation"], dtype=torch.float64)))
    return torch.stack(pix), torch.stack(ego)


def _blob_world(seed: int = 0, c: int = 4) -> torch.Tensor:
    """(X, Y) class map made of large rectangles (few boundary cells)."""
    g = torch.Generator().manual_seed(seed)
    world = torch.zeros(GRID.shape, dtype=torch.long)
    for _ in range(12):
        i0 = int(torch.randint(0, GRID.nx - 20, (1,), generator=g))
        j0 = int(torch.randint(0, GRID.ny - 12, (1,), generator=g))
        world[i0 : i0 + 20, j0 : j0 + 12] = int(torch.randint(1, c, (1,), generator=g))
    return world


def _labels_from_world(world: torch.Tensor, rays: losses.RayGrid, label_hw) -> torch.Tensor:
    """Image labels by nearest-cell lookup at each ray hit; misses = 255. -> (N, h, w)."""
    ij = geometry.ego_to_cell(GRID, rays.xy).floor().long()  # (N, P, 2)
    i = ij[..., 0].clamp(0, GRID.nx - 1)
    j = ij[..., 1].clamp(0, GRID.ny - 1)
    lab = world[i, j]
    lab = torch.where(rays.valid, lab, torch.full_like(lab, 255))
    return lab.reshape(-1, *label_hw).to(torch.uint8)


def test_ray_hits_project_back_to_their_pixels() -> None:
    pix, ego = _rig()
    label_hw = (45, 80)  # half the image resolution
    rays = losses.compute_ray_grid(pix, ego, label_hw, IMAGE_HW, GRID)
    assert rays.xy.shape == (6, 45 * 80, 2) and rays.valid.any(dim=1).all()
    # the upper half of every image looks above the horizon: no hits there
    assert not rays.valid.reshape(6, 45, 80)[:, :15].any()
    pts = torch.cat([rays.xy.double(), torch.zeros_like(rays.xy[..., :1]).double()], dim=-1)
    uv, depth = geometry.ego_to_pixels(pix, ego, pts)
    want = geometry.pixel_grid(*label_hw, scale_to=IMAGE_HW, dtype=torch.float64)
    err = (uv - want.unsqueeze(0)).norm(dim=-1)[rays.valid]
    assert float(err.max()) < 1e-2  # float32 storage of xy
    assert bool((depth[rays.valid] > 0).all())
    assert bool(geometry.inside_grid(GRID, rays.xy[rays.valid]).all())


def test_reprojection_loss_near_zero_for_the_true_world_and_high_otherwise() -> None:
    pix, ego = _rig()
    label_hw = (45, 80)
    cache = losses.RayGridCache(GRID)
    rays = cache.batch(pix.unsqueeze(0), ego.unsqueeze(0), label_hw, IMAGE_HW)
    world = _blob_world()
    labels = _labels_from_world(world, losses.RayGrid(rays.xy[0], rays.valid[0]), label_hw)[None]
    onehot = torch.nn.functional.one_hot(world, 4).permute(2, 0, 1)[None].float()
    good, stats = losses.reprojection_loss(30 * onehot, labels, rays, GRID)
    wrong = torch.roll(onehot, shifts=7, dims=2)
    bad, _ = losses.reprojection_loss(30 * wrong, labels, rays, GRID)
    assert 0 < stats["reproj_valid_frac"] < 0.5
    assert float(good) < 0.5 and float(bad) > 5 * float(good) + 1.0
    # argmax of the sampled logits agrees with the labels almost everywhere
    sampled = losses.reproject_logits(onehot, GRID, rays).argmax(1)  # (1, N, P)
    valid = rays.valid
    agree = (sampled[valid] == labels.reshape(1, 6, -1).long()[valid]).float().mean()
    assert float(agree) > 0.97
    # a second call for the same rig is a cache hit
    cache.batch(pix.unsqueeze(0), ego.unsqueeze(0), label_hw, IMAGE_HW)
    assert cache.misses == 1 and cache.hits == 1


def test_reprojection_gradient_only_reaches_seen_cells_and_ignores_masked_pixels() -> None:
    pix, ego = _rig()
    label_hw = (45, 80)
    rays = losses.RayGridCache(GRID).batch(pix[None], ego[None], label_hw, IMAGE_HW)
    logits = torch.zeros(1, 4, *GRID.shape, requires_grad=True)
    labels = torch.ones(1, 6, *label_hw, dtype=torch.uint8)
    loss, _ = losses.reprojection_loss(logits, labels, rays, GRID)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(np.log(4), rel=1e-5)
    seen = logits.grad.abs().sum(1)[0] > 0
    assert 0.05 < float(seen.float().mean()) < 1.0
    # all-ignore labels, or a confidence below the threshold: zero loss, zero gradient, no NaN
    logits.grad = None
    loss, _ = losses.reprojection_loss(logits, torch.full_like(labels, 255), rays, GRID)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0
    conf = torch.full(labels.shape, 0.3)
    loss, st = losses.reprojection_loss(logits, labels, rays, GRID, confidence=conf, min_confidence=0.5)
    assert float(loss.detach()) == 0.0 and st["reproj_valid_frac"] == 0.0
    # class weights scale the per-pixel CE
    w = torch.tensor([1.0, 3.0, 1.0, 1.0])
    loss_w, _ = losses.reprojection_loss(logits.detach(), labels, rays, GRID, class_weights=w)
    assert float(loss_w) == pytest.approx(3 * np.log(4), rel=1e-5)


def test_reprojection_loss_ignores_hits_outside_a_small_grid() -> None:
    pix, ego = _rig()
    small = BEVGrid(-4.0, 4.0, -2.0, 2.0, 0.25)
    big = losses.compute_ray_grid(pix, ego, (45, 80), IMAGE_HW, GRID)
    tiny = losses.compute_ray_grid(pix, ego, (45, 80), IMAGE_HW, small)
    assert int(tiny.valid.sum()) < int(big.valid.sum())
    assert bool(geometry.inside_grid(small, tiny.xy[tiny.valid]).all())


def test_cached_calibration_moved_by_ego_motion_equals_the_composed_rig() -> None:
    pix, ego = _rig()
    motion = geometry.yaw_transform(torch.full((6,), 0.02, dtype=torch.float64),
                                    torch.full((6,), 0.4, dtype=torch.float64), torch.full((6,), -0.1, dtype=torch.float64))
    direct = losses.compute_ray_grid(pix, motion @ ego, (45, 80), IMAGE_HW, GRID)
    cache = losses.RayGridCache(GRID)
    moved = cache.batch(pix[None], ego[None], (45, 80), IMAGE_HW, sample_T_camego=motion[None])
    assert torch.equal(moved.valid[0], direct.valid)
    assert torch.allclose(moved.xy[0][direct.valid], direct.xy[direct.valid], atol=1e-3)
    cache.batch(pix[None], ego[None], (45, 80), IMAGE_HW, sample_T_camego=(motion @ motion)[None])
    assert cache.hits == 1  # another ego motion, same calibration: cached


def test_loss_normalisation_is_per_sample() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 8)
    target = torch.randint(0, 3, (2, 16, 8))
    target[1, :, :6] = 255  # sample 1 has far fewer valid cells
    both, _ = losses.supervised_loss(logits, target)
    a, _ = losses.supervised_loss(logits[:1], target[:1])
    b, _ = losses.supervised_loss(logits[1:], target[1:])
    assert float(both) == pytest.approx((float(a) + float(b)) / 2, rel=1e-6)


def test_supervised_loss_and_dice() -> None:
    target = torch.randint(0, 4, (2, 32, 16))
    perfect = 30 * torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float()
    l0, st = losses.supervised_loss(perfect, target, dice_weight=1.0)
    assert float(l0) < 1e-3 and st["dice"] < 1e-3
    l1, st1 = losses.supervised_loss(torch.zeros_like(perfect), target, dice_weight=1.0)
    assert st1["ce"] == pytest.approx(np.log(4), rel=1e-5) and st1["dice"] > 0.3
    assert float(l1) == pytest.approx(st1["ce"] + st1["dice"], rel=1e-5)


def _pose(x: float, y: float, yaw: float) -> torch.Tensor:
    t = torch.tensor
    return geometry.yaw_transform(t([yaw]), t([x]), t([y]))


def test_temporal_loss_zero_when_the_world_is_consistent_and_detaches_prev() -> None:
    world = _blob_world(1)
    g_prev, g_cur = _pose(100.0, 50.0, 0.0), _pose(102.0, 50.0, 0.0)  # moved 2 m = 8 cells forward
    onehot = torch.nn.functional.one_hot(world, 4).permute(2, 0, 1)[None].float()
    # the same static world seen from 2 m further ahead: cell i now shows what i+8 showed
    cur = torch.roll(onehot, shifts=-8, dims=2)
    prev = (20 * onehot).requires_grad_(True)
    cur_logits = (20 * cur).requires_grad_(True)
    loss, st = losses.temporal_loss(cur_logits, prev, g_cur, g_prev, GRID)
    assert float(loss.detach()) < 1e-4 and 0.8 < st["temporal_overlap_frac"] < 0.95
    wrong, _ = losses.temporal_loss(cur_logits.roll(5, dims=3), prev, g_cur, g_prev, GRID)
    assert float(wrong.detach()) > 1.0
    wrong.backward()
    assert prev.grad is None  # the previous frame is the detached side
    assert float(cur_logits.grad.abs().sum()) > 0
    # without a previous frame the sample contributes nothing
    none, _ = losses.temporal_loss(20 * onehot, prev, g_cur, g_prev, GRID, has_prev=torch.tensor([False]))
    assert float(none) == 0.0


def test_prediction_stats() -> None:
    flat = losses.prediction_stats(torch.zeros(1, 4, 8, 8))
    assert flat["pred_entropy"] == pytest.approx(np.log(4), rel=1e-5)
    sharp = torch.zeros(1, 4, 8, 8)
    sharp[:, 2] = 50
    st = losses.prediction_stats(sharp)
    assert st["pred_entropy"] < 1e-6 and st["pred_fg_frac"] == 1.0


def test_bev_ground_truth_reprojected_reproduces_the_image_ground_truth(tiny_synth) -> None:
    """Geometry end to end on the synthetic world: BEV GT (map rasteriser) pushed through the
    reprojection path (dataset matrices -> ray grid -> BEV lookup) == image GT (renderer) mapped
    through the synth label map, on ground pixels away from image-class edges."""
    import scipy.ndimage as ndi
    from PIL import Image

    from bevctl.config import class_set_from_name
    from bevctl.data.bev_gt import bev_gt_for_sample
    from bevctl.data.nuscenes import load_index
    from bevctl.data.synth import SYNTH_CLASSES
    from bevctl.pseudolabel.label_maps import resolve_label_map
    from bevctl.train.dataset import TrainDataset

    root, version = tiny_synth
    index = load_index(root, version)
    class_set = class_set_from_name("hdmapnet")
    grid = BEVGrid(-20.0, 20.0, -10.0, 10.0, 0.1)  # finer than demo: thin markings stay resolvable
    lut = resolve_label_map(dict(enumerate(SYNTH_CLASSES)), class_set)
    samples = index.all_samples()
    image_hw = (samples[0].cameras[0].height, samples[0].cameras[0].width)
    ds = TrainDataset(samples, index.samples, image_hw)
    agree = np.zeros(class_set.num_classes)
    total = np.zeros(class_set.num_classes)
    for k, s in enumerate(samples):
        gt = torch.from_numpy(bev_gt_for_sample(root, s, grid, class_set)).long()
        item = ds[k]
        rays = losses.compute_ray_grid(item["pix_T_cam"], item["ego_T_cam"], image_hw, image_hw, grid)
        onehot = torch.nn.functional.one_hot(gt, class_set.num_classes).permute(2, 0, 1)[None].float()
        rep = losses.reproject_logits(onehot, grid, losses.RayGrid(rays.xy[None], rays.valid[None]))[0]
        rep = rep.argmax(0).reshape(6, *image_hw).numpy()
        valid = rays.valid.reshape(6, *image_hw).numpy()
        for n, cam in enumerate(s.cameras):
            png = np.asarray(Image.open(Path(root) / "semantic" / (cam.filename.rsplit(".", 1)[0] + ".png")))
            lab = lut[png]
            interior = ndi.maximum_filter(png, size=3) == ndi.minimum_filter(png, size=3)
            m = valid[n] & (lab != 255) & interior
            for c in range(class_set.num_classes):
                mc = m & (lab == c)
                agree[c] += (rep[n][mc] == c).sum()
                total[c] += mc.sum()
    overall = agree.sum() / total.sum()
    per_class = dict(zip(class_set.names_with_background, (agree / np.maximum(total, 1)).round(3)))
    assert total.sum() > 50_000 and overall >= 0.99, (overall, per_class)
    # the markings and the curb band (not just the road) land where the map says; the synthetic
    # curb straddles the road edge like the BEV boundary band (measured: 1.000 boundary, 1.000
    # ped_crossing, 1.000 divider, 0.996 background on this dataset)
    for name, n_min in (("boundary", 200), ("ped_crossing", 1000), ("divider", 20)):
        c = class_set.names_with_background.index(name)
        assert total[c] > n_min and agree[c] / total[c] >= 0.95, (name, per_class)


def _forward_camera(focal: float, cx: float, cy: float, height: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One pinhole camera ``height`` m above the ego origin looking along +x (optical z -> ego x,
    optical x -> ego -y, optical y -> ego -z): ``pix_T_cam (1, 3, 3)``, ``ego_T_cam (1, 4, 4)``."""
    pix = torch.tensor([[[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    rot = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    return pix, geometry.make_transform(rot, torch.tensor([0.0, 0.0, height], dtype=torch.float64))[None]


def test_reprojection_loss_counts_only_pixels_whose_ray_lands_inside_the_grid() -> None:
    """Pixels above the horizon and pixels whose ground hit lies outside the grid carry real
    (non-ignore) labels here: they must neither count nor change the loss.

    Hand geometry (8 x 4 image, f = 4, principal point (1.5, 3.5), camera 1 m up, looking
    forward): rows 0-3 look above the horizon; row r >= 4 hits the ground at x = 4 / (r - 3.5),
    i.e. 8 m (row 4: outside the 4 m grid), 2.67, 1.6 and 1.14 m (rows 5-7: inside, |y| <= 1 m).
    So exactly rows 5-7 (12 of 32 pixels) are valid."""
    grid = BEVGrid(0.0, 4.0, -2.0, 2.0, 0.5)
    pix, ego = _forward_camera(4.0, 1.5, 3.5, 1.0)
    hw = (8, 4)
    rays = losses.RayGridCache(grid).batch(pix[None], ego[None], hw, hw)
    want_valid = torch.zeros(8, 4, dtype=torch.bool)
    want_valid[5:] = True
    assert torch.equal(rays.valid.reshape(8, 4), want_valid)
    # every hit inside the grid is more than half a cell from its border, so the bilinear read of a
    # spatially constant logit map is that constant: each valid pixel's CE is -log_softmax(l)[label]
    class_logits = torch.tensor([0.5, 2.0, -1.0, 0.0])
    logits = class_logits.view(1, 4, 1, 1).expand(1, 4, *grid.shape).clone()
    log_p = torch.log_softmax(class_logits, 0)
    labels = torch.zeros(1, 1, *hw, dtype=torch.uint8)
    labels[0, 0, 5:] = torch.tensor([1, 2, 3, 0], dtype=torch.uint8)  # each class 3 times among the valid rows
    labels[0, 0, :5] = 2  # real labels where the ray misses the ground (rows 0-3) or leaves the grid (row 4)
    loss, stats = losses.reprojection_loss(logits, labels, rays, grid)
    want = -float(log_p[[1, 2, 3, 0]].mean())
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert stats["reproj_valid_frac"] == pytest.approx(12 / 32)
    # other labels at the invalid pixels (above the horizon, beyond the grid): the same loss
    for rows in (slice(0, 4), slice(4, 5)):
        other = labels.clone()
        other[0, 0, rows] = 1
        again, st = losses.reprojection_loss(logits, other, rays, grid)
        assert float(again) == float(loss) and st["reproj_valid_frac"] == pytest.approx(12 / 32)


def test_ray_grid_cache_is_lru_per_rig() -> None:
    grid = BEVGrid(0.0, 4.0, -2.0, 2.0, 0.5)
    rigs = [_forward_camera(4.0, 1.5, 3.5, h) for h in (1.0, 1.5, 2.0)]
    cache = losses.RayGridCache(grid, max_entries=2)
    hw = (8, 4)
    for pix, ego in rigs[:2]:
        cache.get(pix, ego, hw, hw)
    cache.get(*rigs[0], hw, hw)  # rig 0 is now the most recently used
    cache.get(*rigs[2], hw, hw)  # evicts rig 1, the least recently used
    assert (cache.hits, cache.misses) == (1, 3)
    cache.get(*rigs[0], hw, hw)
    assert (cache.hits, cache.misses) == (2, 3)
    cache.get(*rigs[1], hw, hw)
    assert (cache.hits, cache.misses) == (2, 4)
    # the key: the matrices to 1e-6, and both resolutions
    pix, ego = rigs[0]
    key = losses.rig_key(pix, ego, hw, hw)
    assert losses.rig_key(pix + 1e-8, ego, hw, hw) == key
    assert losses.rig_key(pix - 1e-8, ego - 1e-8, hw, hw) == key  # zeros nudged below 0 too
    real_pix, real_ego = (m.float() for m in _rig())  # the values, not their dtype, make the key
    assert losses.rig_key(real_pix, real_ego, hw, hw) == losses.rig_key(real_pix.double(), real_ego.double(), hw, hw)
    assert losses.rig_key(pix, ego + 1e-5, hw, hw) != key and losses.rig_key(pix + 1e-5, ego, hw, hw) != key
    assert losses.rig_key(pix, ego, (4, 2), hw) != key and losses.rig_key(pix, ego, hw, (16, 8)) != key
    # a camera 2 m up sees the ground twice as far: row 6 hits at x = 2 * 4 / 2.5 = 3.2 m
    rays = cache.get(*rigs[2], hw, hw)
    np.testing.assert_allclose(rays.xy.reshape(8, 4, 2)[6, :, 0].numpy(), 3.2, rtol=1e-6)
    np.testing.assert_allclose(rays.xy.reshape(8, 4, 2)[6, :, 1].numpy(), 3.2 * np.array([0.375, 0.125, -0.125, -0.375]),
                               rtol=1e-6)


def test_reprojection_confidence_threshold_keeps_pixels_at_the_threshold() -> None:
    grid = BEVGrid(0.0, 4.0, -2.0, 2.0, 0.5)
    pix, ego = _forward_camera(4.0, 1.5, 3.5, 1.0)
    rays = losses.RayGridCache(grid).batch(pix[None], ego[None], (8, 4), (8, 4))
    class_logits = torch.tensor([0.0, 1.0, 2.0])
    logits = class_logits.view(1, 3, 1, 1).expand(1, 3, *grid.shape).clone()
    labels = torch.zeros(1, 1, 8, 4, dtype=torch.uint8)
    labels[0, 0, 5] = 1
    labels[0, 0, 6:] = 2
    conf = torch.full((1, 1, 8, 4), 0.5)
    conf[0, 0, 6:] = 0.25  # rows 6-7 below the threshold: only row 5 (class 1) counts
    loss, st = losses.reprojection_loss(logits, labels, rays, grid, confidence=conf, min_confidence=0.5)
    assert float(loss) == pytest.approx(-float(torch.log_softmax(class_logits, 0)[1]), rel=1e-6)
    assert st["reproj_valid_frac"] == pytest.approx(4 / 32)
    all_rows, _ = losses.reprojection_loss(logits, labels, rays, grid, confidence=conf, min_confidence=0.0)
    assert float(all_rows) != pytest.approx(float(loss))  # threshold 0: confidence is not used
    default, _ = losses.reprojection_loss(logits, labels, rays, grid, confidence=conf)  # no threshold by default
    assert float(default) == float(all_rows)
    no_conf, _ = losses.reprojection_loss(logits, labels, rays, grid, min_confidence=0.5)  # no map: no threshold
    assert float(no_conf) == float(all_rows)
    # a batch of 2 whose first sample has no valid pixel: it adds 0, the second its own mean
    rays2 = losses.RayGrid(xy=rays.xy.expand(2, -1, -1, -1), valid=rays.valid.expand(2, -1, -1))
    labels2 = torch.cat([torch.full_like(labels, 255), labels])
    both, _ = losses.reprojection_loss(logits.expand(2, -1, -1, -1), labels2, rays2, grid,
                                       confidence=conf.expand(2, -1, -1, -1), min_confidence=0.5)
    assert float(both) == pytest.approx(float(loss) / 2, rel=1e-6)


def test_supervised_loss_class_weights_and_dice_by_hand() -> None:
    # uniform logits over 2 classes: CE = log 2 per cell; weights 1 (background) and 3 (class 1)
    target = torch.tensor([[[0, 1], [1, 255]]])  # (1, 2, 2); one ignored cell
    loss, _ = losses.supervised_loss(torch.zeros(1, 2, 2, 2), target, class_weights=torch.tensor([1.0, 3.0]))
    assert float(loss) == pytest.approx(np.log(2) * (1 + 3 + 3) / 3, rel=1e-6)
    # soft Dice of class 1 with p = 1/2 everywhere on its 2 valid cells of 3 (eps = 1):
    # inter = 2 * 0.5 = 1, denom = (0.5 + 0.5 + 0.5) + 2 = 3.5 -> 1 - (2 + 1) / (3.5 + 1) = 1/3
    valid = target != 255
    safe = torch.where(valid, target, torch.zeros_like(target))
    d = losses.dice_loss(torch.zeros(1, 2, 2, 2), safe, valid)
    assert float(d) == pytest.approx(1 / 3, rel=1e-6)
    total, st = losses.supervised_loss(torch.zeros(1, 2, 2, 2), target, dice_weight=0.5)
    assert st["dice"] == pytest.approx(1 / 3, rel=1e-6) and st["ce"] == pytest.approx(np.log(2), rel=1e-6)
    assert float(total) == pytest.approx(np.log(2) + 0.5 / 3, rel=1e-6)
    # 3 classes, class 2 absent from the GT: class 1 as above with p = 1/3 (1 - (4/3 + 1) / (3 + 1) = 5/12),
    # class 2 only predicted (1 - 1 / (1 + 1) = 1/2)
    d3 = losses.dice_loss(torch.zeros(1, 3, 2, 2), safe, valid)
    assert float(d3) == pytest.approx((5 / 12 + 1 / 2) / 2, rel=1e-6)
    _, no_dice = losses.supervised_loss(torch.zeros(1, 2, 2, 2), target)
    assert "dice" not in no_dice


def test_temporal_loss_is_the_kl_of_the_previous_frame_by_hand() -> None:
    grid = BEVGrid(0.0, 2.0, 0.0, 1.0, 0.5)
    same = _pose(10.0, 5.0, 0.3)
    q_logits = torch.tensor([0.0, 1.0, -1.0])
    p_logits = torch.tensor([1.0, 0.0, 0.5])
    q, logp = torch.softmax(q_logits, 0), torch.log_softmax(p_logits, 0)
    kl = float((q * (q.log() - logp)).sum())
    prev = q_logits.view(1, 3, 1, 1).expand(2, 3, *grid.shape).clone().requires_grad_(True)
    cur = p_logits.view(1, 3, 1, 1).expand(2, 3, *grid.shape).clone()
    poses = same.expand(2, 4, 4)
    loss, st = losses.temporal_loss(cur, prev, poses, poses, grid)  # no motion: every cell is covered
    assert float(loss) == pytest.approx(kl, rel=1e-5) and st["temporal_overlap_frac"] == 1.0
    half, st = losses.temporal_loss(cur, prev, poses, poses, grid, has_prev=torch.tensor([True, False]))
    assert float(half) == pytest.approx(kl / 2, rel=1e-5) and st["temporal_overlap_frac"] == 0.5
    both, _ = losses.temporal_loss(cur, prev, poses, poses, grid, detach_prev=False)
    both.backward()
    assert prev.grad is not None and float(prev.grad.abs().sum()) > 0  # not detached on request


def test_temporal_target_is_renormalised_where_the_warp_reads_slightly_past_the_previous_grid() -> None:
    """A motion of half a millimetre on a one-cell-deep grid: every current cell reads the previous
    map 0.001 cells past its outermost centre (coverage 0.999...), still inside the overlap; the
    warped previous distribution is renormalised, so the loss is the by-hand KL."""
    grid = BEVGrid(0.0, 0.5, 0.0, 1.0, 0.5)  # (1, 2) cells
    q_logits = torch.tensor([0.0, 1.0, -1.0])
    p_logits = torch.tensor([1.0, 0.0, 0.5])
    q, logp = torch.softmax(q_logits, 0), torch.log_softmax(p_logits, 0)
    kl = float((q * (q.log() - logp)).sum())
    prev = q_logits.view(1, 3, 1, 1).expand(1, 3, *grid.shape).clone()
    cur = p_logits.view(1, 3, 1, 1).expand(1, 3, *grid.shape).clone()
    loss, st = losses.temporal_loss(cur, prev, _pose(0.0005 * 0.5, 0.0, 0.0), _pose(0.0, 0.0, 0.0), grid)
    assert st["temporal_overlap_frac"] == 1.0
    assert float(loss) == pytest.approx(kl, rel=1e-5)


def test_reprojection_loss_is_the_mean_of_per_sample_losses_in_a_batch() -> None:
    """Each sample's mean cross-entropy counts once, however many valid pixels it has; a sample
    without any (all labels ignored) counts as 0."""
    pix, ego = _rig()
    label_hw = (45, 80)
    rays = losses.RayGridCache(GRID).batch(pix[None].expand(2, -1, -1, -1), ego[None].expand(2, -1, -1, -1),
                                           label_hw, IMAGE_HW)
    one = losses.RayGrid(rays.xy[:1], rays.valid[:1])
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, *GRID.shape, generator=g)
    labels = torch.randint(0, 4, (2, 6, *label_hw), generator=g, dtype=torch.uint8)
    labels[1, :3] = 255  # sample 1: half the cameras ignored, so fewer valid pixels
    alone = [float(losses.reprojection_loss(logits[i:i + 1], labels[i:i + 1], one, GRID)[0]) for i in range(2)]
    assert alone[0] != pytest.approx(alone[1], rel=1e-3)
    both, _ = losses.reprojection_loss(logits, labels, rays, GRID)
    assert float(both) == pytest.approx(sum(alone) / 2, rel=1e-5)
    labels[1] = 255  # sample 1 has nothing to learn from
    first_only, _ = losses.reprojection_loss(logits, labels, rays, GRID)
    assert float(first_only) == pytest.approx(alone[0] / 2, rel=1e-5)


def test_ray_grid_is_computed_in_float64_and_stored_in_float32() -> None:
    """A float32 calibration (as loaded from a batch) gives exactly the rays of the same values
    in float64; the hits are kept in float32 (half the memory of the cache)."""
    pix, ego = _rig()
    pix32, ego32 = pix.float(), ego.float()
    label_hw = (45, 80)
    r32 = losses.compute_ray_grid(pix32, ego32, label_hw, IMAGE_HW, GRID)
    r64 = losses.compute_ray_grid(pix32.double(), ego32.double(), label_hw, IMAGE_HW, GRID)
    assert r32.xy.dtype == torch.float32 and r64.xy.dtype == torch.float32
    assert torch.equal(r32.xy, r64.xy) and torch.equal(r32.valid, r64.valid)


def test_ray_hits_beyond_max_range_are_not_hits() -> None:
    """max_range (metres along the ground from the camera) bounds the hits, computed directly and
    through the cache alike."""
    pix, ego = _rig()
    label_hw = (45, 80)
    far = BEVGrid(-60.0, 60.0, -60.0, 60.0, 0.5)  # large enough to hold hits beyond 10 m
    full = losses.compute_ray_grid(pix, ego, label_hw, IMAGE_HW, far)
    near = losses.compute_ray_grid(pix, ego, label_hw, IMAGE_HW, far, max_range=10.0)
    cached = losses.RayGridCache(far, max_range=10.0).get(pix, ego, label_hw, IMAGE_HW)
    cam_xy = ego[:, None, :2, 3].float()  # (N, 1, 2)
    dist = (full.xy - cam_xy).norm(dim=-1)
    assert bool((full.valid & (dist >= 10.0)).any()) and bool((full.valid & (dist < 9.9)).any())
    # the same hits up to 10 m (1 mm of slack for the float32 storage of the hits), none beyond
    assert not bool((near.valid & ~full.valid).any())
    assert not bool((full.valid & (dist < 10.0 - 1e-3) & ~near.valid).any())
    assert not bool((near.valid & (dist >= 10.0 + 1e-3)).any())
    assert torch.equal(cached.valid, near.valid)


def test_supervised_loss_of_a_sample_with_one_valid_cell_is_that_cells_cross_entropy() -> None:
    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    target = torch.full((1, 4, 4), 255)
    target[0, 2, 1] = 2
    loss, _ = losses.supervised_loss(logits, target)
    want = -torch.log_softmax(logits[0, :, 2, 1], 0)[2]
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
