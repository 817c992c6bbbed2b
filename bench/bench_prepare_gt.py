"""prepare-gt throughput on the synthetic world: samples/s per core, hdmapnet and demo grids.

Writes a small synthetic dataset (cached under a temp dir), then for each (grid, class set):

- ``rasterise ms``: ``bev_gt_for_sample`` alone per sample (map already loaded), one core;
- ``1 worker``: ``prepare_gt(workers=0)`` end to end in this process (query + rasterise + Zarr
  write + done records) -> samples/s per core;
- ``2 workers``: ``prepare_gt(workers=2)`` with a spawned process pool, wall time including
  worker start-up and each worker's map load.

Results: bench/results/prepare_gt.json and prepare_gt.md.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bevctl.config import CLASS_SETS, GRID_PRESETS  # noqa: E402
from bevctl.data.bev_gt import bev_gt_for_sample  # noqa: E402
from bevctl.data.nuscenes import load_index  # noqa: E402
from bevctl.storage.gt_store import prepare_gt  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VERSION = "v1.0-synth"
SCENES, SAMPLES_PER_SCENE = 4, 20
CASES = (("hdmapnet", "hdmapnet"), ("hdmapnet", "markings"), ("demo", "hdmapnet"))


def make_dataset(root: Path) -> None:
    from bevctl.data.synth import SynthConfig, write_synthetic_dataset

    cfg = SynthConfig(scenes=SCENES, samples_per_scene=SAMPLES_PER_SCENE, image_hw=(90, 160), seed=0,
                      version=VERSION)
    write_synthetic_dataset(cfg, root, overwrite=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_gt_"))
    try:
        dataroot = work / "synth"
        t0 = time.perf_counter()
        make_dataset(dataroot)
        synth_s = time.perf_counter() - t0
        index = load_index(dataroot, VERSION)
        samples = index.all_samples()
        rows = []
        for grid_name, cs_name in CASES:
            grid, cs = GRID_PRESETS[grid_name], CLASS_SETS[cs_name]
            bev_gt_for_sample(dataroot, samples[0], grid, cs)  # load the map in this process
            t = time.perf_counter()
            for s in samples:
                bev_gt_for_sample(dataroot, s, grid, cs)
            raster_ms = (time.perf_counter() - t) / len(samples) * 1e3
            one = prepare_gt(dataroot, VERSION, grid, cs, work / f"{grid_name}-{cs_name}-1.zarr",
                             workers=0, progress=False, index=index)
            two = prepare_gt(dataroot, VERSION, grid, cs, work / f"{grid_name}-{cs_name}-2.zarr",
                             workers=2, progress=False, index=index)
            store_bytes = sum(f.stat().st_size for f in (work / f"{grid_name}-{cs_name}-1.zarr").rglob("*")
                              if f.is_file())
            rows.append({
                "grid": grid_name, "grid_shape": list(grid.shape), "class_set": cs_name,
                "samples": one.done_now,
                "rasterise_ms_per_sample": round(raster_ms, 2),
                "samples_per_s_1_worker": round(one.samples_per_s, 1),
                "samples_per_s_2_workers": round(two.samples_per_s, 1),
                "wall_s_2_workers": round(two.seconds, 2),
                "store_kib_per_sample": round(store_bytes / 1024 / one.done_now, 2),
                "class_fractions": {k: round(v, 4) for k, v in one.class_fractions.items()},
            })
            print(rows[-1], flush=True)
        result = {
            "benchmark": "prepare_gt",
            "dataset": {"kind": "synthetic", "version": VERSION, "scenes": SCENES,
                        "samples": len(samples), "synth_seconds": round(synth_s, 1)},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": rows,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "prepare_gt.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [
            f"prepare-gt on the synthetic world ({len(samples)} samples, {os.cpu_count()} CPUs, "
            f"{result['date_utc']})",
            "",
            "| grid | class set | rasterise ms/sample | samples/s, 1 worker (per core) | samples/s, 2 workers "
            "(wall incl. start-up) | KiB/sample in gt.zarr |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['grid']} {r['grid_shape'][0]}x{r['grid_shape'][1]} | {r['class_set']} | "
                f"{r['rasterise_ms_per_sample']} | {r['samples_per_s_1_worker']} | "
                f"{r['samples_per_s_2_workers']} ({r['wall_s_2_workers']} s) | {r['store_kib_per_sample']} |"
            )
        (RESULTS / "prepare_gt.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
