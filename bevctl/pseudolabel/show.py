"""``bevctl labels show`` and ``labels stats`` output: masks over camera images, text tables."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bevctl.data.images import read_image
from bevctl.data.nuscenes import load_index
from bevctl.errors import BevctlError
from bevctl.io import atomic_write
from bevctl.storage.labels import LabelStore


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 distinct colours, stable per class id (golden-ratio hues)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.1 + i * 0.618033988749895) % 1.0, 0.85 if i % 2 else 0.6, 0.95)
        out[i] = (int(r * 255), int(g * 255), int(b * 255))
    return out


def _find_sample(store: LabelStore, dataroot: Path, token: str):  # -> SampleRecord
    index = load_index(dataroot, store.dataset_version, check_images=False)
    if token not in index.samples:
        raise BevctlError(f"{dataroot}/{store.dataset_version}: no sample '{token}' (is --dataroot the labeled dataset?)")
    return index.samples[token]


def render_sample(
    images: list[np.ndarray],
    masks: np.ndarray,
    cameras: tuple[str, ...],
    alpha: float = 0.5,
    id2label: dict[int, str] | None = None,
) -> Image.Image:
    """A 2x3 mosaic: each camera image (resized to the mask size) with its mask blended in,
    and a legend of the classes present below it."""
    n, h, w = masks.shape
    pal = palette()
    cols = 3
    rows = (n + cols - 1) // cols
    present = [int(c) for c in np.unique(masks)]
    per_line = max(1, (cols * w) // 180)
    legend_h = 18 * ((len(present) + per_line - 1) // per_line) + 4
    canvas = Image.new("RGB", (cols * w, rows * h + legend_h), (0, 0, 0))
    for k in range(n):
        img = Image.fromarray(images[k]).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
        base = np.asarray(img, dtype=np.float32)
        blended = (1 - alpha) * base + alpha * pal[masks[k]].astype(np.float32)
        tile = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
        ImageDraw.Draw(tile).text((4, 4), cameras[k], fill=(255, 255, 255))
        canvas.paste(tile, ((k % cols) * w, (k // cols) * h))
    draw = ImageDraw.Draw(canvas)
    for j, cid in enumerate(present):
        x, y = 4 + (j % per_line) * 180, rows * h + 4 + 18 * (j // per_line)
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in pal[cid]))
        name = (id2label or {}).get(cid, f"id {cid}")
        draw.text((x + 16, y), f"{cid} {name}"[:26], fill=(255, 255, 255))
    return canvas


def show_sample(
    store_path: str | Path,
    out: str | Path,
    token: str | None = None,
    dataroot: str | Path | None = None,
    alpha: float = 0.5,
) -> Path:
    """Write the six images of ``token`` (default: the first done sample) with their masks."""
    store = LabelStore.open(store_path)
    if token is None:
        done = store.done_tokens()
        if not done:
            raise BevctlError(f"{store_path}: no labeled sample yet")
        token = done[0]
    masks = store.get(token)  # (6, H, W)
    root = Path(dataroot) if dataroot else (Path(store.dataroot) if store.dataroot else None)
    if root is None:
        raise BevctlError(f"{store_path}: no dataroot recorded; pass --dataroot")
    if not dataroot and not root.is_dir():
        raise BevctlError(f"dataset {root} (recorded in {store_path}) not found: if it moved, pass its new "
                          "location as --dataroot")
    sample = _find_sample(store, root, token)
    images = []
    for cam in sample.cameras:
        images.append(read_image(cam.image_path))
    canvas = render_sample(images, masks, store.cameras, alpha, store.id2label)
    out = Path(out)

    def write(f: Any) -> None:
        canvas.save(f, format="PNG")

    atomic_write(out, write)
    return out


def format_stats(stats: dict[str, Any]) -> str:
    s = stats["samples"]
    lines = [
        f"store        {stats['path']}",
        f"labeler      {stats['model_id']}  masks {stats['resolution'][0]}x{stats['resolution'][1]}",
        f"samples      {s['done']} done, {s['failed']} failed, {s['todo']} todo ({stats['images_done']} images)",
        f"on disk      {stats['bytes_on_disk'] / 1e6:.2f} MB (masks {stats['mask_bytes_on_disk'] / 1e6:.2f} MB, "
        f"{stats['compression_ratio']:.0f}x smaller than raw)",
        "",
        f"{'id':>4}  {'class':<32} {'pixels %':>9} {'in images %':>12}",
    ]
    for c in sorted(stats["classes"], key=lambda c: -c["pixels"]):
        lines.append(
            f"{c['id']:>4}  {c['name'][:32]:<32} {100 * c['pixel_fraction']:>9.3f} {100 * c['image_coverage']:>12.1f}"
        )
    return "\n".join(lines)
