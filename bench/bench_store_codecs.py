"""Mask codecs of the label store: bytes per mask and encode/decode time.

Masks of two labelers on a small synthetic world (images 225x400, masks stored at 225x400):

- the shipped labeler ``bevctl-synth`` (a small trained Mask2Former; 0 = sky),
- a tiny *random* Swin Mask2Former with 66 classes (Mapillary-sized class list; its masks are
  noisier than a trained model's, the hard case for run-length coding).

Codecs, each on one chunk per mask (as the store writes them):

- ``bevctl_rle`` + zstd-15: bevctl's own run-length codec (needs bevctl to read),
- zstd-15 with its checksum (ships with zarr: any Zarr v3 reader),
- zstd-19 / zstd-22 with checksum,
- Blosc zstd-5 bitshuffle + crc32c (the store's default for other arrays).

Results: bench/results/store_codecs.json and store_codecs.md. Timings on a shared 2-core box.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VERSION = "v1.0-synth"
SCENES, SAMPLES_PER_SCENE = 2, 4  # 8 samples, 48 images
IMAGE_HW = (225, 400)


def make_dataset(root: Path) -> list[str]:
    from bevctl.data.nuscenes import load_index
    from bevctl.data.synth import SynthConfig, write_synthetic_dataset

    cfg = SynthConfig(scenes=SCENES, samples_per_scene=SAMPLES_PER_SCENE, image_hw=IMAGE_HW, seed=3,
                      version=VERSION, workers=1)
    write_synthetic_dataset(cfg, root, overwrite=True, progress=False)
    index = load_index(root, VERSION)
    return [cam.image_path for split in index.split_names() for s in index.samples_in(split) for cam in s.cameras]


def random_swin_m2f(work: Path) -> Path:
    """A tiny random Swin Mask2Former with 66 classes, heads sharpened so its map is not constant."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    names = [f"class{i}" for i in range(66)]
    swin = SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=7,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        encoder_layers=1, decoder_layers=1, num_attention_heads=2, dim_feedforward=64, num_queries=16,
        num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("class_predictor"):
                p.normal_(0.0, 1.0)
            if "mask_embedder.2.0" in name:
                p.mul_(100.0)
    out = work / "random-swin-m2f"
    model.save_pretrained(out)
    Mask2FormerImageProcessorPil(size={"height": 224, "width": 384}, size_divisor=32).save_pretrained(out)
    return out


def label(model: str, paths: list[str]) -> np.ndarray:
    """uint8 (N, H, W) masks of ``paths`` at IMAGE_HW."""
    from bevctl.pseudolabel.job import read_image
    from bevctl.pseudolabel.labeler import load_labeler

    lab = load_labeler(model, device="cpu")
    out = []
    for k in range(0, len(paths), 6):
        batch = [lab.preprocess(read_image(p)) for p in paths[k:k + 6]]
        masks, _ = lab.predict(batch, IMAGE_HW, False)
        out.append(masks)
    return np.concatenate(out)


def codecs() -> dict[str, tuple]:
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    from bevctl.storage.rle import RunLengthCodec

    return {
        "bevctl_rle + zstd-15 (today; needs bevctl)": (RunLengthCodec(), ZstdCodec(level=15)),
        "zstd-15 + checksum": (ZstdCodec(level=15, checksum=True),),
        "zstd-19 + checksum": (ZstdCodec(level=19, checksum=True),),
        "zstd-22 + checksum": (ZstdCodec(level=22, checksum=True),),
        "blosc zstd-5 bitshuffle + crc32c": (BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()),
    }


def measure(masks: np.ndarray, work: Path) -> list[dict]:
    import zarr

    from bevctl.storage.location import du

    n, h, w = masks.shape
    rows = []
    for name, comp in codecs().items():
        path = work / f"m{len(rows)}.zarr"
        arr = zarr.create_array(str(path), shape=(n, h, w), chunks=(1, h, w), dtype="uint8", fill_value=255,
                                compressors=comp, config={"write_empty_chunks": True})
        t0 = time.perf_counter()
        for i in range(n):
            arr[i] = masks[i]
        enc = (time.perf_counter() - t0) / n
        arr = zarr.open_array(str(path), mode="r")
        dec = []
        for i in range(n):
            t0 = time.perf_counter()
            assert np.array_equal(arr[i], masks[i])
            dec.append(time.perf_counter() - t0)
        rows.append({"codecs": name, "bytes_per_mask": round(du(path / "c") / n, 1),
                     "write_ms": round(1000 * enc, 2), "read_ms_median": round(1000 * statistics.median(dec), 2)})
    base = rows[0]["bytes_per_mask"]
    for r in rows:
        r["vs_rle"] = round(r["bytes_per_mask"] / base, 3)
    return rows


def to_markdown(res: dict) -> str:
    lines = [f"Mask codecs, {res['masks_per_labeler']} masks {res['resolution'][0]}x{res['resolution'][1]} per "
             f"labeler, one chunk per mask; {res['machine']} (shared, loaded: timings are rough).", ""]
    for lab in res["labelers"]:
        lines += [f"**{lab['labeler']}** (runs per mask, median: {lab['runs_per_mask_median']})", "",
                  "| codecs | bytes/mask | vs bevctl_rle | write ms/mask | read ms/mask |", "|---|---:|---:|---:|---:|"]
        for r in lab["rows"]:
            lines.append(f"| {r['codecs']} | {r['bytes_per_mask']} | **{r['vs_rle']}** | {r['write_ms']} | "
                         f"{r['read_ms_median']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as tmp:
        work = Path(tmp)
        paths = make_dataset(work / "data")
        labelers = [("bevctl-synth (shipped)", "bevctl-synth"),
                    ("random Swin Mask2Former, 66 classes", str(random_swin_m2f(work)))]
        res = {"machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "masks_per_labeler": len(paths),
               "resolution": list(IMAGE_HW), "labelers": []}
        for desc, model in labelers:
            masks = label(model, paths)
            runs = [int(np.count_nonzero(m.ravel()[1:] != m.ravel()[:-1]) + 1) for m in masks]
            res["labelers"].append({"labeler": desc, "runs_per_mask_median": int(statistics.median(runs)),
                                    "rows": measure(masks, work / desc.split()[0])})
            print(json.dumps(res["labelers"][-1], indent=1), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "store_codecs.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "store_codecs.md").write_text(to_markdown(res) + "\n")
    print(to_markdown(res))


if __name__ == "__main__":
    main()
