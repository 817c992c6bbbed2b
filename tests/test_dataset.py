"""Training dataset helpers: scene fractions, intrinsics scaling, label resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bevctl import geometry
from bevctl.errors import BevctlError
from bevctl.train.dataset import choose_scenes, load_image, resize_nearest, scale_intrinsics


def test_choose_scenes_is_deterministic_seeded_nested_and_whole_scenes() -> None:
    scenes = [f"scene-{i:04d}" for i in range(40)]
    a = choose_scenes(scenes, 0.5, seed=7)
    assert a == choose_scenes(list(reversed(scenes))[::-1], 0.5, seed=7)  # same input -> same subset
    assert len(a) == 20 and len(set(a)) == 20 and set(a) <= set(scenes)
    assert a == [s for s in scenes if s in set(a)]  # kept in input order
    b = choose_scenes(scenes, 0.5, seed=8)
    assert set(a) != set(b)  # the seed matters
    quarter = choose_scenes(scenes, 0.25, seed=7)
    assert set(quarter) <= set(a)  # smaller fractions nest inside larger ones for one seed
    assert choose_scenes(scenes, 1.0, seed=3) == scenes
    assert len(choose_scenes(scenes[:3], 0.01, seed=0)) == 1  # at least one scene
    with pytest.raises(BevctlError, match="fraction"):
        choose_scenes(scenes, 0.0, seed=0)


def test_scale_intrinsics_keeps_pixel_centres() -> None:
    k = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]])
    k2 = scale_intrinsics(k, (900, 1600), (450, 800))
    pts = torch.tensor([[[1.0, -0.5, 10.0], [-3.0, 0.7, 25.0]]], dtype=torch.float64)
    uv, _ = geometry.cam_to_pixels(torch.from_numpy(k), pts)
    uv2, _ = geometry.cam_to_pixels(torch.from_numpy(k2), pts)
    # a point at full-res pixel u lands at (u + 0.5) / 2 - 0.5 in the half-size image
    assert torch.allclose(uv2, (uv + 0.5) / 2 - 0.5, atol=1e-9)


def test_resize_nearest_by_pixel_centres() -> None:
    m = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    assert resize_nearest(m, (2, 2)).tolist() == [[[5, 7], [13, 15]]]
    assert resize_nearest(m, (4, 4)) is m
    up = resize_nearest(m, (8, 8))
    assert up[0, ::2, ::2].tolist() == m[0].tolist()


def test_load_image_resizes_and_errors(tmp_path) -> None:
    img = np.zeros((90, 160, 3), dtype=np.uint8)
    img[:, 80:] = 200
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    out = load_image(str(tmp_path / "a.jpg"), (45, 80))
    assert out.shape == (3, 45, 80) and out.dtype == np.uint8
    assert out[:, :, :35].mean() < 20 and out[:, :, 45:].mean() > 180
    with pytest.raises(BevctlError, match="b.jpg"):
        load_image(str(tmp_path / "b.jpg"), (45, 80))
