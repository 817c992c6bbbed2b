"""BEVFormer model: deformable attention vs a loop reference, visibility, temporal alignment,
gradients, shapes per preset, save/load, AMP, and that it learns."""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil

import pytest
import torch
from transformers import AutoBackbone, ResNetConfig

from bevctl.data.rig import reference_rig

from bevctl import geometry
from bevctl.config import GRID_PRESETS, BEVGrid, class_set_from_name
from bevctl.data.nuscenes import load_index
from bevctl.data.records import CAMERAS
from bevctl.errors import BevctlError
from bevctl.train.model import (
    BEVFormer,
    align_prev_bev,
    compile_model,
    count_parameters,
    load_model,
    model_config_from_dict,
    model_preset,
    save_model,
)
from bevctl.train.dataset import TrainDataset
from bevctl.train.model import encoder as encoder_module
from bevctl.train.model.attention import init_sampling_offsets, ms_deform_attn, ms_deform_attn_reference, softmax_fp32
from bevctl.train.model.encoder import FFN, SpatialCrossAttention, TemporalSelfAttention, visible_query_index

DEMO_GRID = GRID_PRESETS["demo"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rig(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real nuScenes rig: ``pix_T_cam (1, 6, 3, 3)`` scaled to ``(h, w)`` and ``ego_T_cam (1, 6, 4, 4)``."""
    ks, ts = reference_rig((h, w))
    return torch.from_numpy(ks).float()[None], torch.from_numpy(ts).float()[None]


def demo_model(seed: int = 0, **overrides) -> BEVFormer:
    torch.manual_seed(seed)
    return BEVFormer(model_preset("demo", **overrides), DEMO_GRID, num_classes=4)


def demo_inputs(model: BEVFormer, b: int = 1, seed: int = 1):
    h, w = model.cfg.image_hw
    k, t = rig(h, w)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 6, 3, h, w, generator=g)
    return images, k.expand(b, -1, -1, -1), t.expand(b, -1, -1, -1)


def yaw_T(yaw: float, tx: float = 0.0, ty: float = 0.0) -> torch.Tensor:
    return geometry.yaw_transform(torch.tensor([yaw]), torch.tensor([tx]), torch.tensor([ty]))  # (1, 4, 4)


# ----------------------------------------------------------------------------------------------
# deformable attention
# ----------------------------------------------------------------------------------------------


def test_deformable_attention_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    b, q, m, dh, p = 2, 5, 3, 4, 3
    shapes = [(7, 9), (4, 5)]
    values = [torch.randn(b, m, dh, h, w, generator=g) for h, w in shapes]
    # include positions outside the map (zero padding) and exactly on the border
    loc = torch.rand(b, q, m, len(shapes), p, 2, generator=g) * 1.4 - 0.2
    loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])
    weights = torch.rand(b, q, m, len(shapes), p, generator=g)
    fast = ms_deform_attn(values, loc, weights)
    slow = ms_deform_attn_reference(values, loc, weights)
    assert fast.shape == (b, q, m * dh)
    torch.testing.assert_close(fast.double(), slow, atol=1e-5, rtol=1e-5)
    # a sample at a pixel centre reads that pixel exactly
    h, w = shapes[0]
    loc2 = torch.tensor([(3 + 0.5) / w, (2 + 0.5) / h]).view(1, 1, 1, 1, 1, 2).expand(b, 1, m, 2, 1, 2).clone()
    wts = torch.zeros(b, 1, m, 2, 1)
    wts[:, :, :, 0] = 1.0
    out = ms_deform_attn(values, loc2, wts).view(b, m, dh)
    torch.testing.assert_close(out, values[0][:, :, :, 2, 3])


def test_deformable_attention_on_one_level_is_a_weighted_bilinear_read():
    """One pyramid level (the toy model's case): both implementations give the weighted sum of
    bilinear reads, computed here by hand at a point a quarter of the way between four pixels."""
    g = torch.Generator().manual_seed(1)
    b, m, dh, h, w = 1, 2, 3, 4, 5
    values = [torch.randn(b, m, dh, h, w, generator=g)]
    # pixel coordinates (x, y) = (1.25, 2.5): 3/4 * 1/2 of (1, 2), 1/4 * 1/2 of (2, 2), ... (centres at integers)
    loc = torch.tensor([(1.25 + 0.5) / w, (2.5 + 0.5) / h]).view(1, 1, 1, 1, 1, 2).expand(b, 1, m, 1, 2, 2).clone()
    loc[..., 1, :] = torch.tensor([(4 + 0.5) / w, (0 + 0.5) / h])  # second point: pixel (4, 0) exactly
    weights = torch.tensor([0.75, 0.25]).view(1, 1, 1, 1, 2).expand(b, 1, m, 1, 2)
    v = values[0][0]  # (M, Dh, H, W)
    bilinear = 0.75 * 0.5 * (v[..., 2, 1] + v[..., 3, 1]) + 0.25 * 0.5 * (v[..., 2, 2] + v[..., 3, 2])
    want = (0.75 * bilinear + 0.25 * v[..., 0, 4]).reshape(1, 1, m * dh)
    torch.testing.assert_close(ms_deform_attn(values, loc, weights), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ms_deform_attn_reference(values, loc, weights), want.double(), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# visibility
# ----------------------------------------------------------------------------------------------


def test_pillars_project_where_expected():
    model = demo_model()
    images, k, t = demo_inputs(model)
    ref, visible = model.pillar_visibility(k, t, model.cfg.image_hw)
    q_xy = model.pillars[:, 0, :2]  # (Q, 2)
    seen = visible.any(-1)[0]  # (N, Q)
    front = CAMERAS.index("CAM_FRONT")
    back = CAMERAS.index("CAM_BACK")
    ahead = (q_xy[:, 0] > 8) & (q_xy[:, 1].abs() < 1.5)
    behind = (q_xy[:, 0] < -8) & (q_xy[:, 1].abs() < 1.5)
    assert seen[front, ahead].all() and not seen[front, behind].any()
    assert seen[back, behind].all() and not seen[back, ahead].any()
    h, w = model.cfg.image_hw
    inside = ref[visible]  # (K, 2); geometry.in_image accepts u in [0, W), i.e. up to half a pixel past 1
    assert (inside >= 0).all() and (inside[:, 0] <= 1 + 0.5 / w).all() and (inside[:, 1] <= 1 + 0.5 / h).all()
    # the ground point straight ahead lands near the horizontal image centre of CAM_FRONT
    j = torch.argmin((q_xy[:, 0] - 10.5).abs() + (q_xy[:, 1] - 0.0).abs() * 10)
    z0 = torch.argmin(model.pillars[0, :, 2].abs())
    assert abs(float(ref[0, front, j, z0, 0]) - 0.5) < 0.1


@torch.no_grad()
def test_query_seen_by_no_camera_gets_no_image_contribution():
    model = demo_model(num_layers=1).eval()
    images, k, t = demo_inputs(model)
    _, visible = model.pillar_visibility(k, t, model.cfg.image_hw)
    unseen = ~visible.any(-1).any(1)[0]  # (Q,)
    assert 0 < int(unseen.sum()) < unseen.numel() // 2  # the cells under/around the car
    a = model(images, k, t).bev.flatten(2)[0]  # (D, Q)
    b = model(torch.randn_like(images) * 3, k, t).bev.flatten(2)[0]
    torch.testing.assert_close(a[:, unseen], b[:, unseen], atol=0, rtol=0)
    assert (a[:, ~unseen] - b[:, ~unseen]).abs().amax(0).min() > 1e-4  # every seen query changes


@torch.no_grad()
def test_moving_one_camera_changes_only_the_queries_it_sees():
    model = demo_model(num_layers=1).eval()
    images, k, t = demo_inputs(model)
    cam = CAMERAS.index("CAM_FRONT_LEFT")
    t2 = t.clone()
    t2[0, cam] = yaw_T(0.3)[0] @ t[0, cam]  # turn that camera 17 degrees to the left
    _, vis1 = model.pillar_visibility(k, t, model.cfg.image_hw)
    _, vis2 = model.pillar_visibility(k, t2, model.cfg.image_hw)
    touched = vis1[0, cam].any(-1) | vis2[0, cam].any(-1)  # (Q,)
    assert 0 < int(touched.sum()) < touched.numel()
    a = model(images, k, t).bev.flatten(2)[0]
    b = model(images, k, t2).bev.flatten(2)[0]
    torch.testing.assert_close(a[:, ~touched], b[:, ~touched], atol=0, rtol=0)
    changed = (a - b).abs().amax(0) > 1e-5
    assert changed[touched].float().mean() > 0.9


def test_gathered_cross_attention_equals_dense(monkeypatch):
    """Attending only over each camera's visible queries gives the dense result, values and grads
    (and `sca_gather` really selects the gathered form in every layer: one visibility index per
    layer and forward, none for the dense form)."""
    dense = demo_model(seed=2, sca_gather=False).train()
    gathered = demo_model(seed=2, sca_gather=True).train()
    gathered.load_state_dict(dense.state_dict())
    images, k, t = demo_inputs(dense, b=2)
    t = t.clone()
    t[1, 0] = yaw_T(0.4)[0] @ t[1, 0]  # different visibility per batch element
    calls = []
    monkeypatch.setattr(encoder_module, "visible_query_index", lambda seen: calls.append(1) or visible_query_index(seen))
    outs = []
    for model, indexed in ((dense, 0), (gathered, len(gathered.encoder.layers))):
        calls.clear()
        out = model(images, k, t)
        assert len(calls) == indexed
        out.logits.square().mean().backward()
        outs.append((out.bev, model.encoder.layers[0].sca.sampling_offsets.weight.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# temporal alignment
# ----------------------------------------------------------------------------------------------


def _smooth_field(grid: BEVGrid, c: int = 3) -> torch.Tensor:
    xy = geometry.bev_cell_centers(grid)  # (X, Y, 2)
    x, y = xy[..., 0], xy[..., 1]
    chans = [torch.sin(0.3 * x + 0.2 * y + i) + torch.cos(0.25 * y - 0.1 * x * i) for i in range(c)]
    return torch.stack(chans)[None]  # (1, C, X, Y)


def test_warp_by_ego_motion_and_back_matches_inside_overlap():
    grid = DEMO_GRID
    f = _smooth_field(grid)
    cur_T_prev = yaw_T(0.25, 1.5, -0.7)
    there, valid1 = align_prev_bev(f, cur_T_prev, grid)
    back, valid2 = align_prev_bev(there, geometry.invert_transform(cur_T_prev), grid)
    # overlap: the cell and its image under the motion are both well inside the grid
    margin = 2 * grid.resolution
    inner = BEVGrid(grid.x_min + margin, grid.x_max - margin, grid.y_min + margin, grid.y_max - margin, grid.resolution)
    xy = geometry.bev_cell_centers(grid)
    pts = torch.cat([xy, torch.zeros_like(xy[..., :1])], -1).reshape(1, -1, 3)
    moved = geometry.transform_points(cur_T_prev, pts)[..., :2].reshape(grid.nx, grid.ny, 2)
    overlap = geometry.inside_grid(inner, xy) & geometry.inside_grid(inner, moved)
    assert overlap.float().mean() > 0.5
    assert valid2[0][overlap].all()
    err = (back[0] - f[0]).abs()[:, overlap]
    assert float(err.max()) < 0.02
    assert float((back[0] - f[0]).abs()[:, ~valid2[0]].max()) > 0.1  # outside: no data, not a copy


def test_pure_translation_moves_features_backwards():
    grid = BEVGrid(-8.0, 8.0, -4.0, 4.0, 1.0)  # 16 x 8 query grid
    f = torch.zeros(1, 1, 16, 8)
    f[0, 0, 12, 5] = 1.0  # prev-frame point at x = 4.5, y = 1.5
    # the ego drove 3 m forward and 1 m left: a static point appears 3 m closer and 1 m to the right
    cur_T_prev = geometry.invert_transform(yaw_T(0.0, 3.0, 1.0))
    out, valid = align_prev_bev(f, cur_T_prev, grid)
    assert out[0, 0, 9, 4] == pytest.approx(1.0) and out.sum() == pytest.approx(1.0)
    assert not valid[0, 13:].any() and valid[0, :13, :7].all()  # the far end is new ground


def test_pure_rotation_turns_features_about_the_ego_origin():
    # an off-centre grid: a rotation about the grid centre (BEVFormer's approximation) would differ
    grid = BEVGrid(-4.0, 12.0, -8.0, 8.0, 1.0)
    f = torch.zeros(1, 1, grid.nx, grid.ny)
    i, j = geometry.ego_to_cell(grid, torch.tensor([5.5, 2.5])).floor().long().tolist()
    f[0, 0, i, j] = 1.0
    # previous frame rotated by +90 deg into the current one: (x, y) -> (-y, x)
    out, _ = align_prev_bev(f, yaw_T(math.pi / 2), grid)
    i2, j2 = geometry.ego_to_cell(grid, torch.tensor([-2.5, 5.5])).floor().long().tolist()
    assert out[0, 0, i2, j2] == pytest.approx(1.0, abs=1e-5)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)


@torch.no_grad()
def test_history_used_and_uncovered_cells_fall_back_to_queries():
    model = demo_model().eval()
    images, k, t = demo_inputs(model)
    first = model(images, k, t)
    prev = torch.randn_like(first.bev)
    with_hist = model(images, k, t, prev_bev=prev, cur_T_prev=torch.eye(4)[None])
    assert (with_hist.bev - first.bev).abs().max() > 1e-3
    # a jump of 1 km: nothing of the previous BEV overlaps -> identical to having no history
    far = model(images, k, t, prev_bev=prev, cur_T_prev=yaw_T(0.0, 1000.0))
    torch.testing.assert_close(far.bev, first.bev)
    with pytest.raises(BevctlError, match="cur_T_prev"):
        model(images, k, t, prev_bev=prev)


# ----------------------------------------------------------------------------------------------
# gradients, shapes, save/load, AMP, config
# ----------------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    model = demo_model().train()
    images, k, t = demo_inputs(model, b=2)
    with torch.no_grad():
        prev = model(images, k, t).bev
    target = torch.randint(0, 4, (2, *DEMO_GRID.shape), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def dead_after_backward() -> list[str]:
        opt.zero_grad()
        out = model(images, k, t, prev_bev=prev, cur_T_prev=yaw_T(0.1, 1.0).expand(2, -1, -1))
        torch.nn.functional.cross_entropy(out.logits, target).backward()
        return [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0.0]

    # As in Deformable DETR / BEVFormer, the offset and weight predictors start at zero weight,
    # so at step 0 the positional encoding (which only feeds them) has no gradient yet ...
    assert set(dead_after_backward()) <= {"pos_row", "pos_col"}
    opt.step()
    # ... and from the first update on, every parameter gets one.
    dead = dead_after_backward()
    assert not dead, dead
    assert (model.cams_embeds.grad.abs().sum(1) > 0).all()  # every camera contributes


def test_extra_fpn_level_runs_and_learns():
    """Like base (C3-C5 + an extra level): levels beyond the backbone's come from stride-2 convs."""
    model = demo_model(num_levels=3).train()
    images, k, t = demo_inputs(model)
    feats = model.image_encoder(images.flatten(0, 1))
    assert [f.shape[-2:] for f in feats] == [(12, 22), (6, 11), (3, 6)]
    model(images, k, t).logits.square().mean().backward()
    extra = model.image_encoder.neck.extra[0].weight.grad
    assert extra is not None and float(extra.abs().sum()) > 0
    assert float(model.level_embeds.grad[2].abs().sum()) > 0


def test_backbone_norm_eval_freezes_batchnorm():
    model = demo_model(backbone_norm_eval=True).train()
    bns = [m for m in model.image_encoder.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns) and model.head.training
    assert not any(p.requires_grad for bn in bns for p in bn.parameters())
    before = [bn.running_mean.clone() for bn in bns]
    images, k, t = demo_inputs(model)
    model(images, k, t).logits.mean().backward()
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(before, bns))


def test_grad_checkpoint_gives_the_same_gradients():
    """The same gradients; and the layers are recomputed in the backward pass (the price of the
    memory saved) only when checkpointing is asked for, and only in a training step."""
    grads = []
    for ckpt in (False, True):
        model = demo_model(seed=6, num_layers=2, grad_checkpoint=ckpt).train()
        ffn_calls = [0]
        model.encoder.layers[0].ffn.register_forward_hook(lambda *_: ffn_calls.__setitem__(0, ffn_calls[0] + 1))
        images, k, t = demo_inputs(model)
        model(images, k, t).logits.square().mean().backward()
        assert ffn_calls[0] == (2 if ckpt else 1)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        model.eval()(images, k, t).logits.square().mean().backward()  # evaluation with gradients: no recompute
        assert ffn_calls[0] == (3 if ckpt else 2)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_demo_output_shapes_on_both_grids():
    with torch.no_grad():
        for grid in (DEMO_GRID, GRID_PRESETS["hdmapnet"]):
            torch.manual_seed(0)
            model = BEVFormer(model_preset("demo"), grid, num_classes=6).eval()
            images, k, t = demo_inputs(model, b=2)
            out = model(images, k, t)
            xq, yq = grid.nx // 4, grid.ny // 4
            assert out.logits.shape == (2, 6, grid.nx, grid.ny)
            assert out.bev.shape == (2, 32, xq, yq) and model.query_grid.shape == (xq, yq)
            assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize(
    "name, query_shape, layers, levels",
    [("tiny", (50, 25), 3, 1), ("small", (100, 50), 3, 1), ("base", (200, 100), 6, 4)],
)
def test_paper_presets_shapes_on_meta_device(name, query_shape, layers, levels):
    cfg = model_preset(name)
    grid = GRID_PRESETS["hdmapnet"]
    with torch.device("meta"):
        model = BEVFormer(cfg, grid, num_classes=4)
        h, w = cfg.image_hw
        out = model(torch.empty(1, 6, 3, h, w), torch.empty(1, 6, 3, 3), torch.empty(1, 6, 4, 4))
        out2 = model(torch.empty(1, 6, 3, h, w), torch.empty(1, 6, 3, 3), torch.empty(1, 6, 4, 4), out.bev, torch.empty(1, 4, 4))
    assert out.logits.shape == out2.logits.shape == (1, 4, 400, 200)
    assert out.bev.shape == (1, 256, *query_shape)
    assert len(model.encoder.layers) == layers and model.level_embeds.shape[0] == levels
    assert cfg.num_points_in_pillar == 4 and cfg.sca_points == 8 and cfg.tsa_points == 4 and cfg.num_heads == 8
    assert 20e6 < count_parameters(model)["total"] < 80e6


def test_save_load_round_trip(tmp_path):
    model = demo_model(seed=3)
    model.train()
    images, k, t = demo_inputs(model)
    model(images, k, t)  # update BN running stats so they differ from init
    model.eval()
    path = tmp_path / "m.pt"
    save_model(model, path, extra={"step": 7})
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    loaded = load_model(path).eval()
    with torch.no_grad():
        a, b = model(images, k, t), loaded(images, k, t)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    payload = torch.load(path, weights_only=True)
    assert payload["extra"] == {"step": 7} and loaded.cfg == model.cfg and loaded.grid == model.grid
    # plain state_dict round trip too
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = demo_model(seed=9).eval()
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(images, k, t).logits, a.logits, atol=0, rtol=0)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BevctlError, match="bad.pt"):
        load_model(tmp_path / "bad.pt")


def test_pretrained_backbone_from_local_dir_and_checkpoint_without_it(tmp_path):
    torch.manual_seed(4)
    hf = AutoBackbone.from_config(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic", out_features=["stage4"])
    )
    src = tmp_path / "resnet"
    hf.save_pretrained(src)
    model = BEVFormer(model_preset("demo", backbone_pretrained=str(src)), DEMO_GRID, 3).eval()
    bb = model.image_encoder.backbone
    assert len(bb.encoder.stages) == 3  # stage 4 is not used by the demo FPN (stages 2, 3): pruned
    torch.testing.assert_close(bb.embedder.embedder.convolution.weight, hf.embedder.embedder.convolution.weight)
    save_model(model, tmp_path / "m.pt")
    shutil.rmtree(src)  # the checkpoint must not need the original weights any more
    loaded = load_model(tmp_path / "m.pt").eval()
    images, k, t = demo_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, k, t).logits, model(images, k, t).logits, atol=0, rtol=0)
    with pytest.raises(BevctlError, match="missing"):
        BEVFormer(model_preset("demo", backbone_pretrained=str(tmp_path / "missing")), DEMO_GRID, 3)


def test_autocast_bf16_is_finite_and_close():
    model = demo_model().eval()
    images, k, t = demo_inputs(model)
    with torch.no_grad():
        ref = model(images, k, t).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, k, t)
    assert torch.isfinite(out.logits.float()).all()
    # bf16 keeps ~3 significant digits; the map must stay essentially the same
    agree = (out.logits.float().argmax(1) == ref.argmax(1)).float().mean()
    assert agree > 0.9
    # a training step under autocast: finite gradients everywhere
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, k, t, prev_bev=out.bev.float(), cur_T_prev=yaw_T(0.1, 0.5))
        loss = out.logits.float().logsumexp(1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_config_overrides_and_errors():
    cfg = model_config_from_dict({"preset": "tiny", "num_layers": 2, "image_hw": [224, 400]})
    assert cfg.num_layers == 2 and cfg.image_hw == (224, 400) and cfg.embed_dim == 256
    assert dataclasses.replace(model_preset("demo"), embed_dim=64).embed_dim == 64
    with pytest.raises(BevctlError, match="unknown key"):
        model_config_from_dict({"preset": "demo", "num_layer": 2})
    with pytest.raises(BevctlError, match="unknown model preset"):
        model_preset("huge")
    with pytest.raises(BevctlError, match="num_heads"):
        model_preset("demo", num_heads=5)
    with pytest.raises(BevctlError, match="not divisible"):
        BEVFormer(model_preset("demo", bev_downsample=16), BEVGrid(-10, 10, -5, 5, 0.5), 3)
    model = demo_model()
    images, k, t = demo_inputs(model)
    with pytest.raises(BevctlError, match="pix_T_cam"):
        model(images, k[:, :5], t)


# ----------------------------------------------------------------------------------------------
# it learns
# ----------------------------------------------------------------------------------------------


def test_model_trains_loss_falls():
    """A simple supervised BEV loss on two fixed synthetic batches: the loss must fall."""
    model = demo_model(seed=0).train()
    batches = []
    for s in range(2):
        images, k, t = demo_inputs(model, b=1, seed=10 + s)
        # blocky BEV labels (lane-like stripes + a crossing), different per batch
        target = torch.zeros(1, DEMO_GRID.nx, DEMO_GRID.ny, dtype=torch.long)
        target[:, :, 10 + 8 * s : 13 + 8 * s] = 1
        target[:, 80 + 10 * s : 90 + 10 * s, :] = 2
        target[:, :, 48:50] = 3
        batches.append((images, k, t, target))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(24):
        images, k, t, target = batches[step % 2]
        loss = torch.nn.functional.cross_entropy(model(images, k, t).logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.5 * first, losses


def test_model_trains_on_synthetic_samples_with_history(tiny_synth):
    """Two consecutive keyframes of the synthetic world (real images, rig and map GT): the second
    frame gets the first's BEV as history; the supervised loss (also on marking cells) falls."""
    root, version = tiny_synth
    index = load_index(root, version)
    tokens = next(toks for toks in index.scenes.values() if len(toks) >= 2)[:2]
    model = demo_model(seed=0).train()
    ds = TrainDataset([index.samples[t] for t in tokens], index.samples, model.cfg.image_hw,
                      rasterize=(str(root), DEMO_GRID, class_set_from_name("hdmapnet")))  # fmt: skip
    items = [ds[i] for i in range(2)]
    images = [((it["images"].float() / 255 - 0.45) / 0.25)[None] for it in items]
    pix = [it["pix_T_cam"][None] for it in items]
    ego = [it["ego_T_cam"][None] for it in items]
    gts = [it["bev_gt"].long()[None] for it in items]
    assert all(int((g > 0).sum()) > 50 for g in gts)  # there are markings to learn
    cur_T_prev = (torch.linalg.inv(items[1]["global_T_ego"]) @ items[0]["global_T_ego"]).float()[None]
    assert float(cur_T_prev[0, :3, 3].norm()) > 0.5  # the ego moved between the keyframes

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        out0 = model(images[0], pix[0], ego[0])
        out1 = model(images[1], pix[1], ego[1], prev_bev=out0.bev.detach(), cur_T_prev=cur_T_prev)
        ce = [torch.nn.functional.cross_entropy(o.logits, g, reduction="none") for o, g in ((out0, gts[0]), (out1, gts[1]))]
        loss = sum(c.mean() for c in ce)
        fg = sum(c[g > 0].mean() for c, g in zip(ce, gts))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), fg.item()))
    first, last = history[0], history[-1]
    assert last[0] < 0.5 * first[0], history
    assert last[1] < 0.8 * first[1], history  # not just the background prior


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = demo_model().eval()
    images, k, t = demo_inputs(model)
    compiled = compile_model(model)
    with torch.no_grad():
        ref = model(images, k, t)
        out = compiled(images, k, t)
        out2 = compiled(images, k, t, prev_bev=out.bev, cur_T_prev=yaw_T(0.05, 0.5))
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert out2.logits.shape == ref.logits.shape


@pytest.mark.parametrize("gather", [True, False])
@torch.no_grad()
def test_cross_attention_averages_over_the_cameras_that_see_a_query(gather):
    """Identity value/output projections, zero sampling offsets and uniform attention weights on
    constant per-camera feature maps: a query gets the mean of the values of exactly the cameras
    that see it (not that sum over all six cameras), and nothing when no camera sees it."""
    d, n, z = 4, 6, 2
    sca = SpatialCrossAttention(dim=d, heads=1, levels=1, points=2, z_anchors=z, dropout=0.0, gather=gather).eval()
    for lin in (sca.value_proj, sca.output_proj):
        lin.weight.copy_(torch.eye(d))
        lin.bias.zero_()
    sca.sampling_offsets.bias.zero_()  # weights are zero at init: every point samples its reference
    cam_value = torch.arange(1.0, n + 1).view(n, 1) * torch.tensor([1.0, -2.0, 0.5, 3.0])  # (N, D)
    feats = [cam_value.view(n, d, 1, 1).expand(n, d, 5, 7).contiguous()]  # (B*N, D, H, W), B = 1
    sees = [[2], [0, 3], [], [0, 1, 2, 3, 4, 5], [5]]  # per query: the cameras that see it
    q = len(sees)
    visible = torch.zeros(1, n, q, z, dtype=torch.bool)
    for qi, cams in enumerate(sees):
        visible[0, cams, qi] = True
    ref = torch.full((1, n, q, z, 2), 0.5)  # the image centre, far from the zero padding
    query = torch.randn(1, q, d, generator=torch.Generator().manual_seed(0))
    pos = torch.randn(1, q, d, generator=torch.Generator().manual_seed(1))
    out = sca(query, pos, feats, ref, visible)[0]  # (Q, D)
    for qi, cams in enumerate(sees):
        want = query[0, qi] + (cam_value[cams].mean(0) if cams else 0.0)
        torch.testing.assert_close(out[qi], want, msg=f"query {qi} seen by cameras {cams}")


def test_sampling_offset_init_points_each_head_its_own_way():
    """BEVFormer's init: zero weights; head m's bias points along angle 2 pi m / M scaled onto the
    unit square, its k-th point k + 1 cells out, the same for every group."""
    lin = torch.nn.Linear(3, 8 * 2 * 3 * 2)
    init_sampling_offsets(lin, num_heads=8, groups=2, points=3)
    assert float(lin.weight.detach().abs().sum()) == 0.0
    bias = lin.bias.detach().view(8, 2, 3, 2)
    dirs = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    want = dirs.view(8, 1, 1, 2) * torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    torch.testing.assert_close(bias, want.expand(8, 2, 3, 2), atol=1e-5, rtol=0)


def test_deformable_attention_runs_in_fp32_and_checks_its_levels():
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(1, 2, 3, 6, 9, generator=g)]
    loc = torch.rand(1, 4, 2, 1, 3, 2, generator=g)
    w = torch.rand(1, 4, 2, 1, 3, generator=g)
    ref = ms_deform_attn(values, loc, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(values, loc, w)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # autocast off inside: the fp32 result exactly
    half = ms_deform_attn([v.to(torch.bfloat16) for v in values], loc, w)
    assert half.dtype == torch.bfloat16  # returned in the values' dtype
    with pytest.raises(ValueError, match="1 value levels for 2 location levels"):
        ms_deform_attn(values, loc.expand(1, 4, 2, 2, 3, 2), w.expand(1, 4, 2, 2, 3))
    p = softmax_fp32(torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=torch.bfloat16))
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.softmax(torch.tensor([[0.0, 1.0], [2.0, 2.0]]), -1))
    torch.testing.assert_close(softmax_fp32(torch.tensor([[0.0, 0.0], [1.0, 3.0]]), 0),
                               torch.softmax(torch.tensor([[0.0, 0.0], [1.0, 3.0]]), 0))


def _tsa_setup(b: int = 2, xq: int = 3, yq: int = 4, d: int = 8):
    torch.manual_seed(0)
    tsa = TemporalSelfAttention(dim=d, heads=2, points=2, dropout=0.0).eval()
    ii, jj = torch.meshgrid(torch.arange(xq) + 0.5, torch.arange(yq) + 0.5, indexing="ij")
    ref = torch.stack([jj / yq, ii / xq], -1).reshape(-1, 2)  # cell centres as (along Y, along X)
    query, prev = torch.randn(b, xq * yq, d), torch.randn(b, xq * yq, d)
    return tsa, ref, query, prev, (xq, yq)


def test_temporal_self_attention_without_offsets_averages_history_and_query_per_cell():
    """Identity value/output projections and no sampling offsets: every point reads its own
    cell, so each query becomes query + (aligned previous BEV + query) / 2 at that cell, per sample."""
    tsa, ref, query, prev, shape = _tsa_setup()
    with torch.no_grad():
        for lin in (tsa.value_proj, tsa.output_proj):
            lin.weight.copy_(torch.eye(lin.in_features))
            lin.bias.zero_()
        tsa.sampling_offsets.weight.zero_()
        tsa.sampling_offsets.bias.zero_()
        tsa.attention_weights.weight.normal_()  # any weights: every point reads the same value
        out = tsa(query, torch.randn(1, *query.shape[1:]), prev, None, ref, shape)
        torch.testing.assert_close(out, query + (prev + query) / 2, atol=1e-5, rtol=1e-5)
        # cells the previous BEV does not cover: the query stands in for it
        valid = torch.rand(query.shape[0], query.shape[1], 1) > 0.5
        out = tsa(query, torch.zeros(1, *query.shape[1:]), prev, valid, ref, shape)
        torch.testing.assert_close(out, query + (torch.where(valid, prev, query) + query) / 2, atol=1e-5, rtol=1e-5)
        # no history at all: the query attends to itself twice
        torch.testing.assert_close(tsa(query, torch.zeros(1, *query.shape[1:]), None, None, ref, shape), 2 * query,
                                   atol=1e-5, rtol=1e-5)
        # every point one cell further along X (offsets are in cells, as (along Y, along X)): cell (i, j)
        # reads cell (i + 1, j); the last row reads the zero padding
        tsa.sampling_offsets.bias.copy_(torch.tensor([0.0, 1.0]).repeat(tsa.sampling_offsets.out_features // 2))
        out = tsa(query, torch.zeros(1, *query.shape[1:]), prev, None, ref, shape)
    xq, yq = shape
    grid = lambda t: t.view(t.shape[0], xq, yq, -1)  # noqa: E731
    want = grid(query).clone()
    want[:, :-1] += (grid(prev)[:, 1:] + grid(query)[:, 1:]) / 2
    torch.testing.assert_close(grid(out), want, atol=1e-5, rtol=1e-5)


def test_temporal_self_attention_adds_the_positional_encoding_where_it_predicts_offsets_and_weights():
    """query + pos drives the offsets and weights: a constant pos p gives the same result as no
    pos with the offset/weight biases shifted by W_query @ p (the pos-free half of the input is prev)."""
    tsa, ref, query, prev, shape = _tsa_setup()
    d = query.shape[-1]
    with torch.no_grad():
        tsa.sampling_offsets.weight.normal_(std=0.05)
        tsa.attention_weights.weight.normal_()
        p = torch.randn(d)
        shifted = copy.deepcopy(tsa)
        for lin in (shifted.sampling_offsets, shifted.attention_weights):
            lin.bias.add_(lin.weight[:, d:] @ p)
        with_pos = tsa(query, p.expand(1, query.shape[1], d), prev, None, ref, shape)
        without = shifted(query, torch.zeros(1, query.shape[1], d), prev, None, ref, shape)
    torch.testing.assert_close(with_pos, without, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_pos, tsa(query, torch.zeros(1, query.shape[1], d), prev, None, ref, shape))


@torch.no_grad()
def test_encoder_ffn_drops_out_after_the_activation_and_after_the_output_projection():
    """Training mode, identity weights, positive inputs: each output unit survives both dropouts
    with probability (1 - p)^2 and is then scaled by 1 / (1 - p)^2."""
    torch.manual_seed(0)
    d, p = 64, 0.5
    ffn = FFN(dim=d, hidden=d, dropout=p).train()
    for lin in (ffn.net[0], ffn.net[3]):
        lin.weight.copy_(torch.eye(d))
        lin.bias.zero_()
    x = torch.rand(64, d) + 0.5
    delta = ffn(x) - x
    kept = delta != 0
    torch.testing.assert_close(delta[kept], x[kept] / (1 - p) ** 2)
    assert 0.2 < kept.float().mean() < 0.3  # (1 - p)^2 = 0.25 of 4096 units


def test_encoder_ffn_is_a_residual_two_layer_mlp():
    """BEVFormer's feed-forward block, computed by hand from its weights: x + W2 relu(W1 x + b1) + b2."""
    torch.manual_seed(0)
    ffn = FFN(dim=8, hidden=16, dropout=0.0).eval()
    first, second = ffn.net[0], ffn.net[3]
    x = torch.randn(3, 5, 8)
    by_hand = x + torch.relu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias
    torch.testing.assert_close(ffn(x), by_hand)


@torch.no_grad()
def test_cross_attention_adds_the_positional_encoding_where_it_predicts_offsets_and_weights():
    """As in temporal self-attention: query + pos drives the sampling offsets and weights, the
    residual is the query alone. A constant pos p gives the same result as no pos with the
    offset/weight biases shifted by W @ p."""
    d, n, z, q = 8, 6, 2, 5
    g = torch.Generator().manual_seed(3)
    sca = SpatialCrossAttention(dim=d, heads=2, levels=1, points=2, z_anchors=z, dropout=0.0).eval()
    sca.sampling_offsets.weight.normal_(std=0.05, generator=g)
    sca.attention_weights.weight.normal_(generator=g)
    feats = [torch.randn(n, d, 5, 7, generator=g)]
    ref = torch.rand(1, n, q, z, 2, generator=g)
    visible = torch.rand(1, n, q, z, generator=g) > 0.4
    query = torch.randn(1, q, d, generator=g)
    p = torch.randn(d, generator=g)
    shifted = copy.deepcopy(sca)
    for lin in (shifted.sampling_offsets, shifted.attention_weights):
        lin.bias.add_(lin.weight @ p)
    with_pos = sca(query, p.expand(1, q, d), feats, ref, visible)
    torch.testing.assert_close(with_pos, shifted(query, torch.zeros(1, q, d), feats, ref, visible), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_pos, sca(query, torch.zeros(1, q, d), feats, ref, visible))


def test_visible_query_index_lists_each_cameras_visible_queries_first_padded_to_the_largest_count():
    seen = torch.tensor([[[False, True, False, True, True],  # camera 0 sees 3 queries: K = 3
                          [False, False, False, False, False],
                          [True, False, False, False, False]]])  # (B=1, N=3, Q=5)
    idx = visible_query_index(seen)
    assert idx.shape == (1, 3, 3)
    assert idx[0, 0].tolist() == [1, 3, 4] and idx[0, 2, 0] == 0  # visible ones in query order
    assert not seen[0, 2, idx[0, 2, 1:]].any() and not seen[0, 1, idx[0, 1]].any()  # then padding
    assert visible_query_index(torch.zeros(2, 6, 4, dtype=torch.bool)).shape == (2, 6, 1)  # none seen: K = 1
    # on the meta device (shape and parameter counting) visibility is unknown: every query, K = Q
    assert visible_query_index(torch.zeros(1, 6, 10, dtype=torch.bool, device="meta")).shape == (1, 6, 10)


@torch.no_grad()
def test_cross_attention_sampling_offsets_are_in_feature_cells_from_the_reference_point():
    """One camera, one head, one point: on a feature map whose value is its column index, a
    sampling offset of (+2, 0) cells reads the value two columns right of the reference point."""
    d, w, h = 1, 16, 4
    sca = SpatialCrossAttention(dim=d, heads=1, levels=1, points=1, z_anchors=1, dropout=0.0).eval()
    for lin in (sca.value_proj, sca.output_proj):
        lin.weight.fill_(1.0)
        lin.bias.zero_()
    sca.sampling_offsets.bias.copy_(torch.tensor([2.0, 0.0]))  # (x, y) in cells of the feature map
    feats = [torch.arange(w, dtype=torch.float32).expand(1, d, h, w).contiguous()]  # value = column index
    ref = torch.tensor([[0.5, 0.5]]).view(1, 1, 1, 1, 2)  # image centre: column w / 2 - 0.5 = 7.5
    query = torch.zeros(1, 1, d)
    out = sca(query, torch.zeros(1, 1, d), feats, ref, torch.ones(1, 1, 1, 1, dtype=torch.bool))
    torch.testing.assert_close(out, torch.full((1, 1, 1), 9.5))
