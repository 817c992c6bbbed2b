"""Trainer benchmark: step-time split, peak memory, loader vs consumption throughput.

    .venv/bin/python bench/bench_train.py [--models demo,tiny] [--steps 6] [--threads 2]
        [--dataroot D --version V --labels labels.zarr] [--workers 2]

Step split: pretraining steps of each model preset (reprojection + temporal loss) with the
trainer's own timers (``t_data`` data wait, ``t_fwd`` forward incl. the no-grad forward of the
previous frame, ``t_loss`` reprojection + temporal losses, ``t_bwd`` backward, ``t_opt``
clip + optimiser + scheduler), averaged over the steps after two warm-up steps. Batches come
from the in-memory toy dataset so the split measures the model, not the disk. Each preset runs
in its own process; peak memory = max RSS (CPU) or ``max_memory_allocated`` (CUDA).

Loader: with a dataset + pseudo-label store, the real ``TrainDataset`` (JPEG decode + resize,
Zarr masks, LUT, previous frame) through a DataLoader with ``--workers`` processes, samples/s,
against the samples/s the demo model consumes. Writes bench/results/train.json and train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PHASES = ("t_data", "t_fwd", "t_loss", "t_bwd", "t_opt")


def run_one(model: str, steps: int, threads: int, device: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    from bevctl.train.config import TrainConfig
    from bevctl.train.build import resolve
    from bevctl.train.loop import RunSpec, train
    from bevctl.train.toy import toy_dataset_factory

    cfg = TrainConfig(model=model, grid="demo" if model in ("demo", "toy") else "hdmapnet", batch_size=1,
                      epochs=1, max_steps=steps, num_workers=0, temporal_weight=0.1, checkpoint_every=10**6,
                      warmup_steps=1)
    hw = resolve(cfg).image_hw
    label_hw = (hw[0] // 2, hw[1] // 2)
    with tempfile.TemporaryDirectory() as tmp:
        spec = RunSpec(mode="pretrain", cfg=cfg, run_dir=Path(tmp) / "run", device=device, progress=False,
                       dataset_factory=toy_dataset_factory, profile=True,
                       extra={"n": steps + 1, "label_hw": label_hw})
        t0 = time.perf_counter()
        train(spec)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    use = rows[2:] if len(rows) > 3 else rows[1:]
    res = {"model": model, "grid": cfg.grid, "image_hw": list(hw), "label_hw": list(label_hw), "batch": 1,
           "steps_timed": len(use), "wall_s": wall, "device": device, "threads": threads}
    for k in (*PHASES, "t_step"):
        res[k] = statistics.mean(r[k] for r in use)
    res["losses_frac"] = res["t_loss"] / res["t_step"]
    res["consumed_samples_per_s"] = 1.0 / res["t_step"]
    if device == "cuda":
        res["peak_mem_gb"] = max(r.get("max_mem_gb", 0) for r in rows)
    else:
        res["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return res


def loader_throughput(dataroot: str, version: str, labels: str, workers: int, batches: int, model: str) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from bevctl.train.config import TrainConfig
    from bevctl.train.dataset import build_train_dataset, collate
    from bevctl.train.loop import RunSpec

    torch.set_num_threads(1)
    cfg = TrainConfig(model=model, grid="demo", batch_size=1, temporal_weight=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        spec = RunSpec(mode="pretrain", cfg=cfg, run_dir=Path(tmp), dataroot=dataroot, version=version,
                       labels=labels)
        ds = build_train_dataset(spec, write_scenes=False)
    n = min(len(ds), batches)
    loader = DataLoader(torch.utils.data.Subset(ds, list(range(n))), batch_size=1, num_workers=workers,
                        collate_fn=collate, prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    first = None
    for i, _ in enumerate(loader):
        if i == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    steady = (n - 1) / (end - first) if n > 1 else float("nan")
    return {"workers": workers, "samples": n, "samples_per_s": steady, "startup_s": first - t0,
            "image_hw": list(ds.image_hw), "with_prev_frame": ds.load_prev}


def markdown(result: dict) -> str:
    lines = ["# Trainer benchmark", "", f"Machine: {result['machine']}", "",
             "## Pretraining step split (batch 1, 6 cameras, reprojection + temporal loss)", "",
             "| model | image | device | data wait ms | forward ms | losses ms | backward ms | optimiser ms "
             "| step ms | losses % | peak mem GB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["steps"]:
        lines.append(f"| {r['model']} | {r['image_hw'][0]}x{r['image_hw'][1]} | {r['device']} | "
                     + " | ".join(f"{1000 * r[k]:.1f}" for k in (*PHASES, "t_step"))
                     + f" | {100 * r['losses_frac']:.1f} | {r['peak_mem_gb']:.2f} |")
    if result.get("loader"):
        L = result["loader"]
        lines += ["", "## Loader vs consumption", "",
                  "| loader workers | loader samples/s | demo model consumes samples/s | ratio |", "|---:|---:|---:|---:|",
                  f"| {L['workers']} | {L['samples_per_s']:.2f} | {L['consumed_samples_per_s']:.2f} | {L['ratio']:.2f} |"]
    lines += ["", "Targets: losses <= 10% of a step; loader >= 3x consumption.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,tiny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dataroot")
    ap.add_argument("--version", default="v1.0-synth")
    ap.add_argument("--labels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loader-samples", type=int, default=40)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.threads, device)))
        return
    steps = []
    for model in args.models.split(","):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run([sys.executable, __file__, "--one", model, "--steps", str(args.steps), "--threads",
                              str(args.threads), "--device", device], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"bench for {model} failed")
        steps.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{model}: step {steps[-1]['t_step'] * 1000:.0f} ms, losses {100 * steps[-1]['losses_frac']:.1f}%")
    load = os.getloadavg()[0]
    result = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, device {device}, "
                         f"{args.threads} threads; load average {load:.1f} when done (shared machine: "
                         f"wall times inflate with load)", "steps": steps}
    if args.dataroot and args.labels:
        L = loader_throughput(args.dataroot, args.version, args.labels, args.workers, args.loader_samples, "demo")
        demo = next((s for s in steps if s["model"] == "demo"), steps[0])
        L["consumed_samples_per_s"] = demo["consumed_samples_per_s"]
        L["ratio"] = L["samples_per_s"] / L["consumed_samples_per_s"]
        result["loader"] = L
        print(f"loader {L['samples_per_s']:.1f} samples/s vs consumed {L['consumed_samples_per_s']:.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "train.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
