"""Benchmark ``bevctl synth``: wall time of the nuScenes-format synthetic dataset writer.

Writes bench/results/synth.json and bench/results/synth.md. Default: the issue's target,
10 scenes x 40 samples at 225x400 with one render process per CPU.

    .venv/bin/python bench/bench_synth.py [--scenes 10] [--samples 40] [--hw 225x400] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    from bevctl.data.synth import SynthConfig, parse_hw, write_synthetic_dataset

    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--hw", default="225x400")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    cfg = SynthConfig(scenes=args.scenes, samples_per_scene=args.samples, image_hw=parse_hw(args.hw), workers=args.workers)
    tmp = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    try:
        import resource

        def cpu() -> float:
            r = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
            return sum(x.ru_utime + x.ru_stime for x in r)

        t0, c0 = time.perf_counter(), cpu()
        summary = write_synthetic_dataset(cfg, tmp / "data", progress=True)
        wall, cpu_s = time.perf_counter() - t0, cpu() - c0
        size = sum(p.stat().st_size for p in (tmp / "data").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "scenes": cfg.scenes,
        "samples_per_scene": cfg.samples_per_scene,
        "image_hw": list(cfg.image_hw),
        "workers": cfg.workers or min(os.cpu_count() or 1, cfg.scenes * -(-cfg.samples_per_scene // cfg.chunk)),
        "cpus": os.cpu_count(),
        "images": summary["images"],
        "wall_s": round(wall, 2),
        "images_per_s": round(summary["images"] / wall, 1),
        "cpu_s": round(cpu_s, 1),  # all processes: what an idle machine would need in total
        "cpu_ms_per_image": round(1000 * cpu_s / summary["images"], 1),
        "samples_per_s": round(summary["samples"] / wall, 2),
        "dataset_mb": round(size / 1e6, 1),
        "target_s": 120,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),  # other processes sharing the CPUs
        "python": platform.python_version(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synth.json").write_text(json.dumps(res, indent=1))
    md = [
        "| scenes x samples | image | workers / cpus | images | wall (s) | CPU (s) | CPU ms/image | images/s | dataset (MB) | target (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {res['scenes']} x {res['samples_per_scene']} | {cfg.image_hw[0]}x{cfg.image_hw[1]} | {res['workers']} / {res['cpus']} "
        f"| {res['images']} | {res['wall_s']} | {res['cpu_s']} | {res['cpu_ms_per_image']} | {res['images_per_s']} "
        f"| {res['dataset_mb']} | {res['target_s']} |",
    ]
    note = f"\n1-minute load average after the run: {res['load_avg_1m_after']} on {res['cpus']} CPUs (shared machine).\n"
    (out / "synth.md").write_text("# bevctl synth\n\n" + "\n".join(md) + "\n" + note)
    print("\n".join(md))


if __name__ == "__main__":
    main()
