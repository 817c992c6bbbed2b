"""Load: the pseudo-label job over a synthetic dataset of >= 10,000 camera images with the fast
``synth-gt`` stand-in labeler, run as the real CLI (``bevctl pseudolabel``, Ray, one CPU actor).
A sampler thread reads the RSS of the driver and of the labeler actors (``/proc/<pid>/status``
VmRSS, descendants of the driver) and the job's progress (the store's ``done`` array) every
0.25 s. Reported: images, seconds, images/s, RSS at 25/50/75/100% progress and the peak, for the
full dataset and one a quarter of its size (memory must not grow with the dataset).

    python bench/bench_load.py [--samples 1680] [--image-size 18x32] [--workdir DIR]

Writes bench/results/load.json and load.md. Images are tiny (the default 18x32) so that the
run measures the job's bookkeeping (the thing that could grow with the dataset size), not the
decoder. The reliability test tests/reliability/test_load.py runs the same measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_SCENE = 42  # 1680 samples = 40 scenes, a quarter = 10 scenes


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's raylet and workers are children of the driver)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


@dataclass
class Trace:
    """(seconds, fraction of samples done, driver RSS MB, summed actor RSS MB) every tick."""

    points: list[tuple[float, float, float, float]] = field(default_factory=list)

    def at(self, fraction: float) -> tuple[float, float]:
        """(driver, actors) RSS at the first tick with at least ``fraction`` of the samples done."""
        for _, f, d, a in self.points:
            if f >= fraction and d > 0:
                return d, a
        _, _, d, a = [p for p in self.points if p[2] > 0][-1]
        return d, a

    def peak(self) -> tuple[float, float]:
        return max(p[2] for p in self.points), max(p[3] for p in self.points)


def make_dataset(out: Path, samples: int, image_hw: tuple[int, int]) -> Path:
    from bevctl.data.synth import SynthConfig, write_synthetic_dataset

    scenes = -(-samples // SAMPLES_PER_SCENE)
    if not out.exists():
        write_synthetic_dataset(SynthConfig(scenes=scenes, samples_per_scene=SAMPLES_PER_SCENE, image_hw=image_hw,
                                            seed=3, workers=1), out, progress=False)
    return out


def run_job(dataroot: Path, out: Path, env: dict[str, str], tick: float = 0.25) -> tuple[dict, Trace, float]:
    """Run ``bevctl pseudolabel`` (synth-gt, 1 Ray actor); sample RSS and progress while it runs.
    Returns (the store's last_summary, the trace, wall seconds)."""
    import numpy as np
    import zarr

    cmd = [sys.executable, "-m", "bevctl.cli", "pseudolabel", "--dataroot", str(dataroot), "--version",
           "v1.0-synth", "--model", "synth-gt", "--workers", "1", "--batch-size", "6", "--out", str(out)]
    trace = Trace()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()

    def sample() -> None:
        done_arr = None
        while not stop.is_set():
            fraction = 0.0
            try:
                if done_arr is None and (out / "done" / "zarr.json").is_file():
                    done_arr = zarr.open_array(str(out / "done"), mode="r")
                if done_arr is not None:
                    fraction = float(np.mean(done_arr[:] == 1))
            except Exception:  # noqa: BLE001 - the store is being created
                done_arr = None
            actors = [p for p in descendants(proc.pid) if "LabelWorker" in cmdline(p)]
            trace.points.append((time.perf_counter() - start, fraction, rss_mb(proc.pid),
                                 sum(rss_mb(p) for p in actors)))
            stop.wait(tick)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"pseudolabel exited {proc.returncode}:\n{output[-3000:]}")
    store = zarr.open_group(str(out), mode="r")
    return dict(store.attrs["bevctl_run"]["last_summary"]), trace, wall


def measure(workdir: Path, samples: int, image_hw: tuple[int, int]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               BEVCTL_CACHE_DIR=str(workdir / "cache"), PYTHONPATH=str(ROOT))
    result: dict = {"image_hw": list(image_hw), "runs": []}
    for n in (samples // 4, samples):
        data = make_dataset(workdir / f"data_{n}", n, image_hw)
        out = workdir / f"labels_{n}.zarr"
        if out.exists():
            shutil.rmtree(out)
        summary, trace, wall = run_job(data, out, env)
        rss = {f"{int(100 * f)}%": [round(v, 1) for v in trace.at(f)] for f in (0.25, 0.5, 0.75, 1.0)}
        peak_d, peak_a = trace.peak()
        d25, _ = trace.at(0.25)
        d100, _ = trace.at(1.0)
        result["runs"].append({
            "samples": summary["samples_total"], "images": summary["images_labeled"],
            "job_seconds": summary["seconds"], "wall_seconds": round(wall, 1),
            "images_per_s": summary["images_per_s"], "samples_done": summary["samples_done"],
            "rss_mb_driver_actors": rss, "peak_driver_mb": round(peak_d, 1), "peak_actors_mb": round(peak_a, 1),
            "driver_growth_25_100_mb": round(d100 - d25, 1), "ticks": len(trace.points),
            "store": str(out),
        })
    return result


def write_results(result: dict, results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Load: pseudolabel over >= 10k images (synth-gt, 1 Ray actor, {result['image_hw'][0]}x"
             f"{result['image_hw'][1]} images)", "",
             "| samples | images | job s | images/s | driver RSS MB at 25 / 50 / 75 / 100 % | driver peak MB | "
             "driver growth 25->100 % MB | actor peak MB |", "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in result["runs"]:
        pts = " / ".join(f"{r['rss_mb_driver_actors'][k][0]:.0f}" for k in ("25%", "50%", "75%", "100%"))
        lines.append(f"| {r['samples']} | {r['images']} | {r['job_seconds']:.0f} | {r['images_per_s']:.0f} | {pts} | "
                     f"{r['peak_driver_mb']:.0f} | {r['driver_growth_25_100_mb']:+.1f} | {r['peak_actors_mb']:.0f} |")
    lines += ["", "Written by `python bench/bench_load.py`; RSS from /proc/<pid>/status every 0.25 s."]
    (results_dir / "load.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1680, help="samples of the large dataset (x6 images)")
    ap.add_argument("--image-size", default="18x32", help="camera image size HxW")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bevctl-bench-load"))
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    from bevctl.data.synth import parse_hw

    args.workdir.mkdir(parents=True, exist_ok=True)
    result = measure(args.workdir, args.samples, parse_hw(args.image_size))
    write_results(result, args.results)
    print((args.results / "load.md").read_text())


if __name__ == "__main__":
    main()
