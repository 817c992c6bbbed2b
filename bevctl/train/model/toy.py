"""A small stand-in for the BEVFormer with its interface (``model: toy`` in a TrainConfig).

``ToyBEVModel`` has BEVFormer's forward signature and output (``logits``, ``bev``) and is a real
(if simple) camera-to-BEV model: a few image convolutions, then every BEV cell centre on the
ground is projected into the six cameras and the image features are sampled there and averaged
over the cameras that see it (inverse perspective mapping), then BEV convolutions. Trainer
tests, benchmarks and DDP checks use it so they do not depend on the full model's cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bevctl import geometry
from bevctl.config import BEVGrid
from bevctl.train.model.backbone import normalize_images

TOY_IMAGE_HW = (64, 112)  # the toy model's input (H, W) unless the TrainConfig sets image_hw


@dataclass
class ToyOutput:
    logits: torch.Tensor  # (B, C, X, Y)
    bev: torch.Tensor  # (B, D, X, Y)


class ToyBEVModel(nn.Module):
    def __init__(self, grid: BEVGrid, num_classes: int, image_hw: tuple[int, int], dim: int = 16,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.grid = grid
        self.image_hw = tuple(image_hw)
        self.img = nn.Sequential(
            nn.Conv2d(3, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU()
        )
        self.bev = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU())
        self.prev_gate = nn.Conv2d(dim, dim, 1)
        self.head = nn.Conv2d(dim, num_classes, 1)
        centers = geometry.bev_cell_centers(grid)  # (X, Y, 2)
        self.register_buffer("centers", torch.cat([centers, torch.zeros_like(centers[..., :1])], -1).reshape(-1, 3),
                             persistent=False)

    def forward(self, images, pix_T_cam, ego_T_cam, prev_bev=None, cur_T_prev=None) -> ToyOutput:
        images = normalize_images(images)  # uint8 -> normalised float, as BEVFormer does
        b, n, _, h, w = images.shape
        feats = self.img(images.reshape(b * n, 3, h, w))  # (BN, D, H, W)
        pts = self.centers.to(pix_T_cam.dtype).expand(b, n, -1, -1)  # (B, N, XY, 3)
        uv, depth = geometry.ego_to_pixels(pix_T_cam, ego_T_cam, pts)
        vis = geometry.in_image(uv, depth, w, h).to(feats.dtype)  # (B, N, XY)
        g = torch.stack([(uv[..., 0] + 0.5) / w * 2 - 1, (uv[..., 1] + 0.5) / h * 2 - 1], -1)
        sampled = F.grid_sample(feats, g.reshape(b * n, 1, -1, 2).to(feats.dtype), align_corners=False)
        sampled = sampled.reshape(b, n, -1, g.shape[2]) * vis.unsqueeze(2)  # (B, N, D, XY)
        bev = sampled.sum(1) / vis.sum(1).clamp(min=1).unsqueeze(1)  # (B, D, XY)
        bev = self.drop(self.bev(bev.reshape(b, -1, self.grid.nx, self.grid.ny)))
        if prev_bev is not None:
            bev = bev + 0.1 * self.prev_gate(prev_bev)
        return ToyOutput(logits=self.head(bev), bev=bev)
