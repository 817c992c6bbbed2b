"""BEVFormer model: step time, peak memory and cost split per preset; deformable attention speed.

For each configuration (preset @ target grid, batch 1 x 6 cameras of the real nuScenes rig at the
preset's image size) in its own subprocess (so peak RSS is per configuration):

- parameter count (total and per part);
- forward time (eval, no grad) and forward+backward time (train, cross-entropy on random labels),
  median over a few repetitions after one warm-up;
- peak memory: on CPU the process's peak RSS (``ru_maxrss``) and its growth over the RSS right
  before the first step (≈ activations + autograd + allocator); on CUDA ``max_memory_allocated``;
- forward cost split (eval): backbone + FPN / temporal self-attention / spatial cross-attention /
  head / rest (FFN, norms, projection of the pillars), from forward hooks.

Plus the pure-PyTorch deformable attention (``grid_sample``) vs the loop reference: time ratio on
the same small problem (the reference is Python loops, so the ratio is large by nature).

``small`` and ``base`` are only counted (meta device) on CPU: a 900x1600 six-camera step takes
minutes there. On a CUDA machine every preset runs (``--device cuda``).

Usage: ``python bench/bench_model.py [--device cpu|cuda] [--threads N] [--reps N]``.
Results: bench/results/model.json and bench/results/model.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# (preset, grid): the CPU set and the extra GPU set
CPU_RUNS = [("demo", "demo", {}), ("demo", "demo", {"embed_dim": 64, "ffn_dim": 128, "num_layers": 2}),
            ("demo", "hdmapnet", {}), ("demo", "hdmapnet", {"sca_gather": False}),
            ("tiny", "hdmapnet", {})]  # fmt: skip
GPU_ONLY = [("small", "hdmapnet", {}), ("base", "hdmapnet", {}), ("base", "hdmapnet", {"sca_gather": False})]
NUM_CLASSES = 4  # hdmapnet class set + background


def _rig(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    from bevctl.data.rig import reference_rig

    ks, ts = reference_rig((h, w))
    return torch.from_numpy(ks).float()[None], torch.from_numpy(ts).float()[None]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _clock(device: torch.device) -> float:
    """CPU: this process's CPU time (other load on a shared machine barely moves it; with one
    thread it equals the compute time). CUDA: wall time after a synchronize."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def run_one(preset: str, grid_name: str, overrides: dict, device_name: str, reps: int) -> dict:
    """Measure one configuration (runs inside its own process)."""
    from bevctl.config import grid_from_name
    from bevctl.train.model import BEVFormer, count_parameters, model_preset

    device = torch.device(device_name)
    torch.manual_seed(0)
    cfg = model_preset(preset, **overrides)
    grid = grid_from_name(grid_name)
    model = BEVFormer(cfg, grid, NUM_CLASSES).to(device)
    h, w = cfg.image_hw
    k, t = _rig(h, w)
    images = torch.randn(1, 6, 3, h, w, device=device)
    k, t = k.to(device), t.to(device)
    target = torch.randint(0, NUM_CLASSES, (1, *grid.shape), device=device)

    # forward cost split via hooks (eval, no grad); timed with _clock
    split: dict[str, float] = {}
    starts: dict[int, float] = {}

    def pre(mod, _inp):
        starts[id(mod)] = _clock(device)

    def post_for(part):
        def post(mod, _inp, _out):
            split[part] = split.get(part, 0.0) + _clock(device) - starts[id(mod)]

        return post

    parts = {"backbone+fpn": [model.image_encoder], "head": [model.head]}
    parts["temporal self-attn"] = [layer.tsa for layer in model.encoder.layers]
    parts["spatial cross-attn"] = [layer.sca for layer in model.encoder.layers]
    handles = []
    for part, mods in parts.items():
        for mod in mods:
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post_for(part)))

    model.eval()
    fwd_times, fwd_wall, split_runs = [], [], []
    with torch.no_grad():
        for i in range(reps + 1):
            split.clear()
            t0, w0 = _clock(device), time.perf_counter()
            out = model(images, k, t)
            t1, w1 = _clock(device), time.perf_counter()
            if i:
                fwd_times.append(t1 - t0)
                fwd_wall.append(w1 - w0)
                split_runs.append({**split, "total": fwd_times[-1]})
        prev = out.bev
    for hnd in handles:
        hnd.remove()
    cur_T_prev = torch.eye(4, device=device)[None]

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    step_times, step_wall = [], []
    for i in range(reps + 1):
        t0, w0 = _clock(device), time.perf_counter()
        out = model(images, k, t, prev_bev=prev, cur_T_prev=cur_T_prev)
        loss = torch.nn.functional.cross_entropy(out.logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1, w1 = _clock(device), time.perf_counter()
        if i:
            step_times.append(t1 - t0)
            step_wall.append(w1 - w0)
        opt.step()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    med = {p: statistics.median(r.get(p, 0.0) for r in split_runs) for p in [*parts, "total"]}
    med["rest"] = max(0.0, med["total"] - sum(med[p] for p in parts))
    res = {
        "preset": preset,
        "grid": grid_name,
        "overrides": overrides,
        "grid_shape": list(grid.shape),
        "query_shape": list(model.query_grid.shape),
        "image_hw": list(cfg.image_hw),
        "params": count_parameters(model),
        "forward_s": statistics.median(fwd_times),
        "fwd_bwd_s": statistics.median(step_times),
        "forward_wall_s": statistics.median(fwd_wall),
        "fwd_bwd_wall_s": statistics.median(step_wall),
        "clock": "cuda wall" if device.type == "cuda" else "process CPU time",
        "forward_split_s": {p: med[p] for p in [*parts, "rest"]},
        "device": device_name,
        "threads": torch.get_num_threads(),
        "reps": reps,
    }
    if device.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        res["peak_rss_mb"] = peak_rss
        res["rss_growth_mb"] = peak_rss - rss_before
    return res


def forward_gflop(preset: str, grid_name: str, overrides: dict) -> float:
    """Forward GFLOP (matmuls and convolutions, torch.utils.flop_counter) on the meta device.
    grid_sample is not counted, and on meta every camera counts every query (dense cross-attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bevctl.config import grid_from_name
    from bevctl.train.model import BEVFormer, model_preset

    cfg = model_preset(preset, **overrides)
    with torch.device("meta"):
        model = BEVFormer(cfg, grid_from_name(grid_name), NUM_CLASSES)
        h, w = cfg.image_hw
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.empty(1, 6, 3, h, w), torch.empty(1, 6, 3, 3), torch.empty(1, 6, 4, 4))
    return counter.get_total_flops() / 1e9


def count_on_meta(preset: str, grid_name: str, overrides: dict) -> dict:
    from bevctl.config import grid_from_name
    from bevctl.train.model import BEVFormer, count_parameters, model_preset

    cfg = model_preset(preset, **overrides)
    grid = grid_from_name(grid_name)
    with torch.device("meta"):
        model = BEVFormer(cfg, grid, NUM_CLASSES)
    return {
        "preset": preset, "grid": grid_name, "overrides": overrides, "grid_shape": list(grid.shape),
        "query_shape": list(model.query_grid.shape), "image_hw": list(cfg.image_hw),
        "params": count_parameters(model), "device": "meta (not run)",
    }  # fmt: skip


def bench_deform_attn() -> dict:
    from bevctl.train.model.attention import ms_deform_attn, ms_deform_attn_reference

    g = torch.Generator().manual_seed(0)
    b, q, m, dh, p = 1, 32, 4, 8, 8
    shapes = [(12, 22), (6, 11)]
    values = [torch.randn(b, m, dh, h, w, generator=g) for h, w in shapes]
    loc = torch.rand(b, q, m, len(shapes), p, 2, generator=g)
    wts = torch.softmax(torch.randn(b, q, m, len(shapes) * p, generator=g), -1).view(b, q, m, len(shapes), p)
    ms_deform_attn(values, loc, wts)
    t0 = time.process_time()
    n_fast = 200
    for _ in range(n_fast):
        fast = ms_deform_attn(values, loc, wts)
    t_fast = (time.process_time() - t0) / n_fast
    t0 = time.process_time()
    slow = ms_deform_attn_reference(values, loc, wts)
    t_slow = time.process_time() - t0
    err = float((fast.double() - slow).abs().max())
    return {
        "problem": {"batch": b, "queries": q, "heads": m, "head_dim": dh, "levels": shapes, "points": p},
        "grid_sample_s": t_fast, "loop_reference_s": t_slow, "speed_ratio": t_slow / t_fast, "max_abs_diff": err,
    }  # fmt: skip


def _label(r: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in r.get("overrides", {}).items())
    return f"{r['preset']} @ {r['grid']}" + (f" ({extra})" if extra else "")


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def write_markdown(results: dict) -> str:
    lines = [
        f"BEVFormer model, batch 1 x 6 cameras; device {results['device']}, {results['threads']} thread(s); "
        f"{results['machine']}. Times are medians of {results['reps']} runs (10 for demo) after a warm-up; fwd+bwd is a "
        "training step with history (prev_bev) and cross-entropy, without the optimizer update. "
        "On CPU, times are the process's CPU time (robust to other load on a shared machine; "
        "wall-clock medians are in model.json); on CUDA, synchronized wall time. "
        f"Machine load average (1 min) at start/end: {results['load_average_1m_start_end'][0]:.1f} / "
        f"{results['load_average_1m_start_end'][1]:.1f} (a shared machine inflates times).",
        "",
        "| preset @ grid | image | queries -> target | params | fwd GFLOP* | forward | fwd+bwd | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        img = "x".join(map(str, r["image_hw"]))
        shp = f"{r['query_shape'][0]}x{r['query_shape'][1]} -> {r['grid_shape'][0]}x{r['grid_shape'][1]}"
        if "forward_s" in r:
            mem = (
                f"{r['peak_cuda_mb']:.0f} MB (CUDA)"
                if "peak_cuda_mb" in r
                else f"{r['peak_rss_mb']:.0f} MB RSS (+{r['rss_growth_mb']:.0f} MB in training)"
            )
            fwd, step = f"{r['forward_s'] * 1e3:.0f} ms", f"{r['fwd_bwd_s'] * 1e3:.0f} ms"
        else:
            mem, fwd, step = "-", "not run (needs a GPU)", "-"
        lines.append(
            f"| {_label(r)} | {img} | {shp} | {_fmt_params(r['params']['total'])} | {r['forward_gflop']:.1f} | {fwd} | {step} | {mem} |"
        )
    lines += ["", "*matmuls and convolutions counted by torch.utils.flop_counter on the meta device (grid_sample "
              "not counted; every camera counted for every query, i.e. an upper bound for the cross-attention).",
              "", "Forward cost split (eval):", "", "| preset @ grid | backbone+FPN | temporal self-attn | spatial cross-attn | head | rest |", "|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if "forward_split_s" not in r:
            continue
        s = r["forward_split_s"]
        tot = sum(s.values())
        cells = [f"{s[p] * 1e3:.0f} ms ({100 * s[p] / tot:.0f}%)" for p in ("backbone+fpn", "temporal self-attn", "spatial cross-attn", "head", "rest")]
        lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
    lines += ["", "Parameters per part:", "", "| preset | backbone+FPN | encoder | head | queries+embeddings | total |", "|---|---|---|---|---|---|"]
    seen = set()
    for r in results["runs"]:
        key = (r["preset"], r["grid"])
        if key in seen or r.get("overrides"):
            continue
        seen.add(key)
        p = r["params"]
        lines.append(
            f"| {r['preset']} @ {r['grid']} | {_fmt_params(p['image_encoder'])} | {_fmt_params(p['encoder'])} | "
            f"{_fmt_params(p['head'])} | {_fmt_params(p['queries_and_embeddings'])} | {_fmt_params(p['total'])} |"
        )
    d = results["deform_attn"]
    lines += [
        "",
        f"Deformable attention ({d['problem']['queries']} queries, {d['problem']['heads']} heads, "
        f"{len(d['problem']['levels'])} levels, {d['problem']['points']} points): grid_sample "
        f"{d['grid_sample_s'] * 1e3:.2f} ms vs loop reference {d['loop_reference_s']:.2f} s = "
        f"**{d['speed_ratio']:.0f}x** faster (max |diff| {d['max_abs_diff']:.1e}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--one", nargs=3, metavar=("PRESET", "GRID", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], json.loads(args.one[2]), args.device, args.reps)))
        return 0

    runs_cfg = CPU_RUNS + (GPU_ONLY if args.device.startswith("cuda") else [])
    load_start = os.getloadavg()[0]
    runs = []
    for preset, grid, overrides in runs_cfg:
        print(f"-- {preset} @ {grid} {overrides or ''}", flush=True)
        cmd = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads),
               "--reps", str(args.reps if preset != "demo" else max(args.reps, 10)),
               "--one", preset, grid, json.dumps(overrides)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"   fwd {runs[-1]['forward_s']:.3f} s, fwd+bwd {runs[-1]['fwd_bwd_s']:.3f} s", flush=True)
    if not args.device.startswith("cuda"):
        runs += [count_on_meta(p, g, o) for p, g, o in GPU_ONLY if not o]
    for r in runs:
        r["forward_gflop"] = forward_gflop(r["preset"], r["grid"], r.get("overrides", {}))
    results = {
        "load_average_1m_start_end": [load_start, os.getloadavg()[0]],
        "device": args.device,
        "threads": args.threads,
        "reps": args.reps,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "runs": runs,
        "deform_attn": bench_deform_attn(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "model.json").write_text(json.dumps(results, indent=2) + "\n")
    md = write_markdown(results)
    (RESULTS / "model.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
