"""Inputs of the cost model (bench/cost_model.py) that no other benchmark measures.

- **label bytes**: bytes per mask and per confidence map in ``labels.zarr`` written by a real
  Mask2Former (the shipped ``bevctl-synth``; an untrained one of the same architecture if it is
  not shipped) and by the ``synth-gt`` oracle, on synthetic 225x400 camera images, stored at
  225x400 and at 450x800 (the nuScenes recipe's ``--resolution``).
- **image decode**: CPU ms to read one 1600x900 camera JPEG with the trainer's loader
  (:func:`bevctl.train.dataset.load_image`) at the input sizes of the model presets, and the
  JPEG's bytes (synthetic images compress better than real ones: the cost model assumes its
  own JPEG size).

Times are process CPU time (robust to other jobs on a shared machine), medians over repeats.
Results: bench/results/cluster_inputs.json and cluster_inputs.md.
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
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bevctl.data.nuscenes import load_index  # noqa: E402
from bevctl.data.synth import SynthConfig, write_synthetic_dataset  # noqa: E402
from bevctl.io import atomic_write_text  # noqa: E402
from bevctl.pseudolabel.job import PseudolabelConfig, run_pseudolabel  # noqa: E402
from bevctl.storage.labels import dir_bytes  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LABEL_IMAGE_HW = (225, 400)
STORE_HW = ((225, 400), (450, 800))
DECODE_IMAGE_HW = (900, 1600)  # nuScenes camera images
DECODE_TO = {"tiny": (450, 800), "small": (720, 1280), "base": (900, 1600)}
DECODE_REPS = 5


def _labeler(work: Path) -> tuple[str, str]:
    """The shipped bevctl-synth Mask2Former, else the same architecture untrained (as in
    bench_pseudolabel)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_pseudolabel import efficiency_model

    return efficiency_model(work)


def bench_label_bytes(work: Path) -> list[dict]:
    root = work / "synth225"
    cfg = SynthConfig(scenes=2, samples_per_scene=4, image_hw=LABEL_IMAGE_HW, seed=5, workers=1)
    write_synthetic_dataset(cfg, root, progress=False)
    model, desc = _labeler(work)
    rows = []
    for name, label in ((model, desc), ("synth-gt", "synth-gt (the world's exact image GT)")):
        for hw in STORE_HW:
            out = work / f"labels-{len(rows)}.zarr"
            t0 = time.perf_counter()
            summary = run_pseudolabel(PseudolabelConfig(
                dataroot=str(root), version=cfg.version, out=str(out), model=name, workers=0, resolution=hw,
                confidence=True, progress=False, threads=1))
            n = summary.samples_done * 6
            rows.append({
                "labeler": label, "image_hw": list(LABEL_IMAGE_HW), "store_hw": list(hw), "images": n,
                "mask_bytes": round(dir_bytes(out / "masks") / n, 1),
                "confidence_bytes": round(dir_bytes(out / "confidence") / n, 1),
                "raw_bytes": hw[0] * hw[1], "wall_s": round(time.perf_counter() - t0, 1),
            })
            print(rows[-1], flush=True)
    return rows


def bench_decode(work: Path) -> dict:
    from bevctl.train.dataset import load_image

    root = work / "synth900"
    cfg = SynthConfig(scenes=1, samples_per_scene=1, image_hw=DECODE_IMAGE_HW, seed=7, workers=1)
    write_synthetic_dataset(cfg, root, progress=False)
    paths = [cam.image_path for s in load_index(root, cfg.version).all_samples() for cam in s.cameras]
    result: dict = {"image_hw": list(DECODE_IMAGE_HW), "images": len(paths),
                    "jpeg_bytes_synthetic": round(statistics.mean(os.path.getsize(p) for p in paths)), "ms": {}}
    for preset, hw in DECODE_TO.items():
        times = []
        for _ in range(DECODE_REPS):
            t0 = time.process_time()
            for p in paths:
                load_image(p, hw)
            times.append((time.process_time() - t0) / len(paths) * 1e3)
        result["ms"][f"{preset} {hw[0]}x{hw[1]}"] = round(statistics.median(times), 2)
    return result


def to_markdown(res: dict) -> str:
    lines = [
        f"Cost-model inputs; {res['machine']}; CPU times are process CPU time (medians).",
        "",
        "| labeler | images | stored at | bytes/mask | bytes/confidence map | raw bytes | raw / (mask+conf) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in res["label_bytes"]:
        total = r["mask_bytes"] + r["confidence_bytes"]
        lines.append(f"| {r['labeler']} | {r['images']} x {r['image_hw'][0]}x{r['image_hw'][1]} | "
                     f"{r['store_hw'][0]}x{r['store_hw'][1]} | {r['mask_bytes']:.0f} | {r['confidence_bytes']:.0f} | "
                     f"{r['raw_bytes']} | {r['raw_bytes'] / total:.0f} |")
    d = res["decode"]
    lines += ["", f"Reading one {d['image_hw'][0]}x{d['image_hw'][1]} camera JPEG with the trainer's loader "
              f"(synthetic JPEG, {d['jpeg_bytes_synthetic'] / 1e3:.0f} kB):", "",
              "| model input | CPU ms per image |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in d["ms"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bevctl-cluster-inputs-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("BEVCTL_CACHE_DIR", str(work / "cache"))
        res = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}",
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "label_bytes": bench_label_bytes(work),
            "decode": bench_decode(work),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "cluster_inputs.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(RESULTS / "cluster_inputs.md", to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
