"""prepare-gt throughput on the synthetic world: samples/s per core, hdmapnet and demo grids.

Writes a small synthetic dataset (cached under a temp dir), then for each (grid, class set):

- ``rasterise ms``: ``bev_gt_for_sample`` alone per sample (map already loaded), one core,
  best of 3 passes over the keyframes;
- ``1 worker``: ``prepare_gt(workers=0)`` end to end in this process (query + rasterise + Zarr
  write + done records) -> samples/s per core;
- ``2 workers``: ``prepare_gt(workers=2)`` with a spawned process pool; ``start-up`` is the time
  until the first task reported (process spawn, imports, map load), the steady rate counts
  only what came after it.

The keyframes are replicated under new tokens (REPEAT times) so that a run lasts long enough to
time; the machine is shared, so the numbers are noisy (the load average is recorded).

Results: bench/results/prepare_gt.json and prepare_gt.md.
"""

from __future__ import annotations

import dataclasses
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
SCENES, SAMPLES_PER_SCENE, REPEAT = 4, 20, 5
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
        keyframes = index.all_samples()
        samples = [dataclasses.replace(s, token=f"{s.token}-{k}") for k in range(REPEAT) for s in keyframes]
        rows = []
        for grid_name, cs_name in CASES:
            grid, cs = GRID_PRESETS[grid_name], CLASS_SETS[cs_name]
            bev_gt_for_sample(dataroot, keyframes[0], grid, cs)  # load the map in this process
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for s in keyframes:
                    bev_gt_for_sample(dataroot, s, grid, cs)
                best = min(best, (time.perf_counter() - t) / len(keyframes))
            tag = f"{grid_name}-{cs_name}"
            one = prepare_gt(dataroot, VERSION, grid, cs, work / f"{tag}-1.zarr", workers=0, progress=False,
                             index=index, samples=samples)
            two = prepare_gt(dataroot, VERSION, grid, cs, work / f"{tag}-2.zarr", workers=2, progress=False,
                             index=index, samples=samples)
            store_bytes = sum(f.stat().st_size for f in (work / f"{tag}-1.zarr").rglob("*") if f.is_file())
            rows.append({
                "grid": grid_name, "grid_shape": list(grid.shape), "class_set": cs_name,
                "samples": one.done_now,
                "rasterise_ms_per_sample": round(best * 1e3, 2),
                "samples_per_s_1_worker": round(one.samples_per_s, 1),
                "samples_per_s_2_workers_wall": round(two.samples_per_s, 1),
                "samples_per_s_2_workers_steady": round(two.steady_samples_per_s, 1),
                "pool_startup_s": round(two.startup_seconds, 2),
                "store_kib_per_sample": round(store_bytes / 1024 / one.done_now, 2),
                "class_fractions": {k: round(v, 4) for k, v in one.class_fractions.items()},
                "load_average_1min": round(os.getloadavg()[0], 1),
            })
            print(rows[-1], flush=True)
        result = {
            "benchmark": "prepare_gt",
            "dataset": {"kind": "synthetic", "version": VERSION, "scenes": SCENES,
                        "keyframes": len(keyframes), "samples_timed": len(samples),
                        "synth_seconds": round(synth_s, 1)},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": rows,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "prepare_gt.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [
            f"prepare-gt on the synthetic world ({len(keyframes)} keyframes x {REPEAT} = {len(samples)} samples, "
            f"{os.cpu_count()} CPUs shared with other jobs, {result['date_utc']})",
            "",
            "| grid | class set | rasterise ms/sample | samples/s, 1 worker (= per core) | samples/s, 2 workers: "
            "wall / steady | pool start-up s | KiB/sample in gt.zarr | load avg |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['grid']} {r['grid_shape'][0]}x{r['grid_shape'][1]} | {r['class_set']} | "
                f"{r['rasterise_ms_per_sample']} | {r['samples_per_s_1_worker']} | "
                f"{r['samples_per_s_2_workers_wall']} / {r['samples_per_s_2_workers_steady']} | "
                f"{r['pool_startup_s']} | {r['store_kib_per_sample']} | {r['load_average_1min']} |"
            )
        (RESULTS / "prepare_gt.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
