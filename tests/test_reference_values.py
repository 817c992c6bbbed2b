"""Pinned reference values (as transformers pins an ``expected_slice`` and the nuScenes devkit
its scores): a seeded demo BEVFormer's output on the reference rig, and one reprojection-loss
value. They were computed once with this code and written here.

If one of these fails, something changed what the model computes at initialisation or what the
loss computes: the initialisation, a default of the demo model or training preset, the rig,
input normalisation, the projection or sampling conventions, the loss's weighting. If the change
is intended, say so in the commit, recompute the values (print the same slices) and pin them
again; if not, it is a bug that every training run would have carried silently.
"""

from __future__ import annotations

import torch

from bevctl.config import grid_from_name
from bevctl.data.rig import reference_rig
from bevctl.geometry import bev_cell_centers
from bevctl.train import losses
from bevctl.train.build import build_model
from bevctl.train.config import load_train_config

IMAGE_HW = (96, 176)  # the demo model's input size


def _rig() -> tuple[torch.Tensor, torch.Tensor]:
    ks, ts = reference_rig(IMAGE_HW)
    return torch.from_numpy(ks).float(), torch.from_numpy(ts).float()


def test_seeded_demo_bevformer_output_on_the_reference_rig() -> None:
    torch.manual_seed(0)
    model = build_model(load_train_config("demo")).eval()
    images = torch.randint(0, 256, (1, 6, 3, *IMAGE_HW), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    k, t = _rig()
    with torch.no_grad():
        out = model(images, k[None], t[None])
    assert out.logits.shape == (1, 4, 128, 64) and out.bev.shape == (1, 32, 32, 16)
    # logits of 4 cells ~9 m ahead of the ego (x index 100), across the centre line
    expected_logits = torch.tensor([
        [-0.103152, -0.102729, -0.103626, -0.101783],
        [0.146031, 0.143317, 0.144616, 0.145621],
        [0.014160, 0.011659, 0.009472, 0.014364],
        [-0.012015, -0.010959, -0.008306, -0.012905],
    ])
    torch.testing.assert_close(out.logits[0, :, 100, 30:34], expected_logits, atol=1e-4, rtol=0)
    # BEV features of one query the front camera sees
    expected_bev = torch.tensor([-0.476653, 0.030164, 1.483158, -0.263128])
    torch.testing.assert_close(out.bev[0, :4, 25, 8], expected_bev, atol=1e-4, rtol=0)


def test_reprojection_loss_value_on_the_reference_rig() -> None:
    grid = grid_from_name("demo")
    centres = bev_cell_centers(grid, dtype=torch.float64)  # (X, Y, 2)
    x, y = centres[..., 0], centres[..., 1]
    logits = torch.stack([torch.zeros_like(x), torch.sin(x / 3), torch.cos(y / 2), torch.sin((x + y) / 5)])
    label_hw = (24, 44)
    ii, jj = torch.meshgrid(torch.arange(label_hw[0]), torch.arange(label_hw[1]), indexing="ij")
    labels = torch.stack([((ii // 4 + jj // 6 + n) % 5).to(torch.uint8) for n in range(6)])  # (6, h, w)
    labels[labels == 4] = 255  # ignore
    k, t = _rig()
    rays = losses.compute_ray_grid(k.double(), t.double(), label_hw, IMAGE_HW, grid)
    loss, stats = losses.reprojection_loss(logits.float()[None], labels[None], losses.RayGrid(rays.xy[None], rays.valid[None]),
                                           grid, class_weights=torch.tensor([1.0, 8.0, 3.0, 8.0]))
    assert abs(stats["reproj_valid_frac"] - 0.2015467) < 1e-6
    assert abs(float(loss) - 7.3917317) < 1e-5
