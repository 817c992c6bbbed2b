"""What ``bench/paper.py --plan gpu`` should cost on one H200: an estimate per phase, written
before any GPU run, from counted and measured numbers (bench/results/paper-gpu-estimate.{json,md}).

Counted (exact for the code): the ``demo-gpu`` model's forward FLOPs per sample
(torch.utils.flop_counter on the meta device, as bench/bench_model.py), the labeler's per image,
and the kernels a training step, an evaluation batch and a labeler batch launch (every non-view
aten op dispatched in one real step on the CPU, counted with a TorchDispatchMode).
Measured here (this CPU, an upper bound for the GPU machine's 16 host cores): the data loader's
CPU time per sample and the labeling job's read/preprocess/write time per image, on a small
world at the plan's 225x400; the world's render and the GT's rasterise time per sample come from
bench/results/synth.json and prepare_gt.json.
Assumed (stated in the table): H200 dense bf16 peak 989 TFLOP/s at 25% utilisation for these
small convolutions and attention layers; 10 us per eager kernel launch (PyTorch dispatch + CUDA
launch on one host thread); a few seconds of start-up per run (dataset index, loader workers).

A step's time is the largest of its compute, its launches and its data (the loader workers run
ahead, the GPU runs behind the launches); a run is its steps plus its start-up; the command is
the shared phases plus every run of ``--seeds 3`` at 50% and 100%, then the 10% and 25% rows.

    .venv/bin/python bench/paper_gpu_estimate.py     # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bevctl.demo import GPU, PLANS, VERSION  # noqa: E402
from bevctl.io import atomic_write_text  # noqa: E402

PEAK_FLOPS = 989e12  # H200 dense bf16 (NVIDIA's datasheet: 1,979 TFLOP/s with sparsity)
UTILISATION = 0.25
LAUNCH_S = 10e-6
RUN_STARTUP_S = 4.0  # per training run: dataset index, 12 loader workers, checkpoints
EVAL_STARTUP_S = 2.0
PROCESS_STARTUP_S = 20.0  # python + torch + transformers imports, the CUDA context, the labeler's load
TIME_BUDGET_S = 480  # make bench-paper-gpu's --time-budget
HOST_CORES = 16
RESULTS = ROOT / "bench" / "results"


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that launch work (views launch nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if not func.is_view:
            self.n += 1
        return func(*args, **(kwargs or {}))


def build_world(root: Path, plan: Any) -> dict[str, float]:
    """A 3-scene x 4-keyframe world at the plan's image size: render, labels (the shipped labeler,
    in process on the CPU), GT. Returns the labeling job's seconds per image outside the model
    (wall time of its decode and write, a single thread), and the render and GT costs per sample
    of the synth and prepare-gt benchmarks."""
    from bevctl.config import class_set_from_name, grid_from_name
    from bevctl.data.synth import SynthConfig, write_synthetic_dataset
    from bevctl.pseudolabel.job import PseudolabelConfig, run_pseudolabel
    from bevctl.storage.gt_store import prepare_gt
    from bevctl.train.config import load_train_config

    write_synthetic_dataset(SynthConfig(scenes=3, samples_per_scene=4, image_hw=plan.image_hw, workers=1),
                            root / "synth", progress=False)
    job = run_pseudolabel(PseudolabelConfig(dataroot=str(root / "synth"), version=VERSION, out=str(root / "labels.zarr"),
                                            model=plan.labeler, workers=0, device="cpu", batch_size=6, inflight=1,
                                            resolution=plan.label_hw, confidence=True, progress=False))
    cfg = load_train_config(plan.train_config)
    prepare_gt(root / "synth", VERSION, grid_from_name(cfg.grid), class_set_from_name(cfg.class_set),
               root / "gt.zarr", workers=1, progress=False)
    synth = json.loads((RESULTS / "synth.json").read_text())  # wall x workers: the render's CPU time, at most
    gt = next(r for r in json.loads((RESULTS / "prepare_gt.json").read_text())["rows"] if r["grid"] == "hdmapnet")
    return {"synth_s_per_sample": 6 * synth["wall_s"] * synth["workers"] / synth["images"],
            "label_cpu_s_per_image": (job.decode_s + job.write_s) / job.images_labeled,
            "label_model_cpu_s_per_image": job.model_s / job.images_labeled,
            "gt_s_per_sample": gt["rasterise_ms_per_sample"] / 1e3,  # on the 4x larger hdmapnet grid
            "gt_pool_startup_s": gt["pool_startup_s"]}


def labeler_costs(plan: Any, root: Path) -> dict[str, float]:
    """Forward FLOPs per image and kernels per batch of the shipped labeler (counted on the CPU)."""
    from bevctl.pseudolabel.job import read_image
    from bevctl.pseudolabel.labeler import load_labeler

    lab = load_labeler(plan.labeler, device="cpu")
    paths = sorted((root / "synth" / "samples").rglob("*.jpg"))[:2]
    batch = [lab.preprocess(read_image(str(p))) for p in paths]
    flops = FlopCounterMode(display=False)
    with flops:
        lab.predict(batch[:1], plan.label_hw, True)
    ops = OpCounter()
    with ops:
        lab.predict(batch, plan.label_hw, True)
    return {"gflop_per_image": flops.get_total_flops() / 1e9, "ops_per_image": ops.n / len(batch)}


def training_costs(plan: Any, root: Path) -> dict[str, Any]:
    """Per mode: the kernels one step launches (model, loss, backward, AdamW) at batch 2, and the
    loader's CPU seconds per sample; the forward FLOPs per sample; the kernels of an eval batch."""
    from bevctl.config import grid_from_name
    from bevctl.train.config import load_train_config
    from bevctl.train.dataset import build_train_dataset
    from bevctl.train.build import build_model, resolve
    from bevctl.train.dataset import collate
    from bevctl.train.loop import RunSpec, make_optimizer
    from bevctl.train.model import BEVFormer, count_parameters, model_preset
    from bevctl.train.tasks import make_task

    out: dict[str, Any] = {}
    cfg0 = load_train_config(plan.train_config)
    mc = model_preset(cfg0.model)
    grid = grid_from_name(cfg0.grid)
    with torch.device("meta"):
        meta = BEVFormer(mc, grid, 4)
        flops = FlopCounterMode(display=False)
        with flops:
            h, w = mc.image_hw
            meta(torch.empty(1, 6, 3, h, w), torch.empty(1, 6, 3, 3), torch.empty(1, 6, 4, 4))
    out["params"] = count_parameters(meta)["total"]
    out["fwd_gflop_per_sample"] = flops.get_total_flops() / 1e9
    for mode in ("pretrain", "finetune"):
        overrides: dict[str, Any] = dict(batch_size=2, num_workers=0)
        if mode == "pretrain":
            overrides["temporal_weight"] = plan.temporal_weight
        cfg = load_train_config(plan.train_config, **overrides)
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = make_optimizer(model, cfg)
        setup = resolve(cfg)
        task = make_task(mode, cfg, setup.grid, setup.num_classes)
        spec = RunSpec(mode=mode, cfg=cfg, run_dir=root / "runs" / mode, dataroot=str(root / "synth"),
                       version=VERSION, labels=str(root / "labels.zarr") if mode == "pretrain" else None,
                       gt=str(root / "gt.zarr") if mode == "finetune" else None, device="cpu")
        dataset = build_train_dataset(spec, write_scenes=False)
        t0 = time.process_time()
        items = [dataset[i] for i in range(min(4, len(dataset)))]
        out[f"{mode}_loader_cpu_s_per_sample"] = (time.process_time() - t0) / len(items)
        counts = []
        def step(batch: dict[str, Any]) -> None:
            loss, _ = task(model, batch, torch.device("cpu"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
            opt.step()

        for b in (1, 2):  # kernels grow with the batch where code loops over samples: extrapolated
            batch = collate(items[:b])
            step(batch)  # not counted: the optimizer's state and the loss's ray cache are made once
            ops = OpCounter()
            with ops:
                step(batch)
            counts.append(ops.n)
        out[f"{mode}_ops_per_step_batch_1_2"] = counts
        out[f"{mode}_ops_per_step"] = counts[0] + (counts[1] - counts[0]) * (plan.batch_size - 1)
        if mode == "finetune":
            model.eval()
            ops = OpCounter()
            with ops, torch.no_grad():
                model(batch["images"], batch["pix_T_cam"], batch["ego_T_cam"])
            out["eval_ops_per_batch"] = ops.n
    return out


def estimate(measured: dict[str, float], lab: dict[str, float], train: dict[str, Any], seeds: int = 3) -> dict[str, Any]:
    plan, rt = PLANS["gpu"], GPU
    samples = plan.scenes * plan.samples_per_scene
    val = samples // 5  # val_fraction 0.2 of the scenes
    train_samples = samples - val
    images = 6 * train_samples  # bench/paper.py labels the train split only
    flops_per_s = PEAK_FLOPS * UTILISATION
    phases: dict[str, float] = {
        "synth": measured["synth_s_per_sample"] * samples / HOST_CORES,
        # in process: read + preprocess + write on label_threads host threads, beside the model on the GPU
        "pseudolabel": images * max(measured["label_cpu_s_per_image"] / rt.label_threads,
                                    lab["gflop_per_image"] * 1e9 / flops_per_s, lab["ops_per_image"] * LAUNCH_S),
        "prepare-gt": measured["gt_pool_startup_s"] + measured["gt_s_per_sample"] * samples / rt.gt_workers,
        "process start-up": PROCESS_STARTUP_S,
    }
    step: dict[str, dict[str, float]] = {}
    for mode in ("pretrain", "finetune"):
        compute = 3 * train["fwd_gflop_per_sample"] * 1e9 * plan.batch_size / flops_per_s
        launches = train[f"{mode}_ops_per_step"] * LAUNCH_S
        data = train[f"{mode}_loader_cpu_s_per_sample"] * plan.batch_size / plan.num_workers
        step[mode] = {"compute_s": compute, "launch_s": launches, "data_s": data, "step_s": max(compute, launches, data)}
    n_batches = -(-val // rt.eval_batch_size)
    eval_s = EVAL_STARTUP_S + n_batches * max(train["fwd_gflop_per_sample"] * 1e9 * rt.eval_batch_size / flops_per_s,
                                              train["eval_ops_per_batch"] * LAUNCH_S,
                                              train["finetune_loader_cpu_s_per_sample"] * rt.eval_batch_size / rt.eval_workers)
    pretrain = RUN_STARTUP_S + plan.pretrain_steps * step["pretrain"]["step_s"]
    finetune = RUN_STARTUP_S + plan.finetune_steps * step["finetune"]["step_s"]
    scratch = RUN_STARTUP_S + plan.baseline_steps * step["finetune"]["step_s"]
    per_seed_headline = pretrain + 2 * finetune + 2 * scratch + 5 * eval_s
    per_seed_other = 2 * (finetune + scratch + 2 * eval_s)  # 10% and 25%
    shared = sum(phases.values())
    return {
        "assumptions": {"peak_flops": PEAK_FLOPS, "utilisation": UTILISATION, "launch_s": LAUNCH_S,
                        "run_startup_s": RUN_STARTUP_S, "eval_startup_s": EVAL_STARTUP_S, "host_cores": HOST_CORES},
        "world": {"samples": samples, "images": images, "train_samples": train_samples, "val_samples": val},
        "measured_cpu": measured, "labeler": lab, "model": train, "step": step,
        "phases_s": phases, "run_s": {"pretrain": pretrain, "finetune": finetune, "scratch": scratch, "eval": eval_s},
        "headline_s": shared + seeds * per_seed_headline,
        "with_10_25_s": shared + seeds * (per_seed_headline + per_seed_other),
        "seeds": seeds, "epochs_scratch": plan.baseline_steps * plan.batch_size / train_samples,
    }


def write(e: dict[str, Any]) -> None:
    plan = PLANS["gpu"]
    m, s, r = e["model"], e["step"], e["run_s"]
    a = e["assumptions"]
    lines = [
        "# `bench/paper.py --plan gpu` on one H200: estimate (no GPU run yet)", "",
        f"World {plan.scenes} scenes x {plan.samples_per_scene} keyframes = {e['world']['samples']} samples "
        f"({6 * e['world']['samples']} images at {plan.image_hw[0]}x{plan.image_hw[1]}; {e['world']['train_samples']} train / "
        f"{e['world']['val_samples']} val); model `{plan.train_config}`: {m['params'] / 1e6:.2f} M parameters, "
        f"{m['fwd_gflop_per_sample']:.1f} GFLOP forward per sample (6 cameras); batch {plan.batch_size}; from scratch "
        f"{plan.baseline_steps} steps = {e['epochs_scratch']:.0f} epochs.", "",
        f"Assumed: H200 {a['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16 at {100 * a['utilisation']:.0f}% utilisation, "
        f"{a['launch_s'] * 1e6:.0f} us per kernel launch, {a['run_startup_s']:.0f} s start-up per run, "
        f"{a['eval_startup_s']:.0f} s per evaluation; CPU times measured on this machine (2 shared cores), "
        f"divided over the GPU host's {a['host_cores']} cores where the work is parallel.", "",
        "| step | compute | kernel launches | data (loader workers) | estimate |", "|---|---|---|---|---|",
    ]
    for mode in ("pretrain", "finetune"):
        st = s[mode]
        lines.append(f"| {mode} | {1e3 * st['compute_s']:.1f} ms ({3 * m['fwd_gflop_per_sample'] * plan.batch_size:.0f} GFLOP) "
                     f"| {1e3 * st['launch_s']:.1f} ms ({m[f'{mode}_ops_per_step']} kernels; batch 1 / 2: "
                     f"{' / '.join(str(n) for n in m[f'{mode}_ops_per_step_batch_1_2'])}) "
                     f"| {1e3 * st['data_s']:.1f} ms ({1e3 * m[f'{mode}_loader_cpu_s_per_sample']:.0f} ms/sample / "
                     f"{plan.num_workers} workers) | **{1e3 * st['step_s']:.1f} ms** |")
    lab = e["labeler"]
    lines += ["", "| phase | estimate (s) | from |", "|---|---|---|",
              f"| synth | {e['phases_s']['synth']:.0f} | {1e3 * e['measured_cpu']['synth_s_per_sample']:.0f} ms/sample (6 images) "
              f"on one core (synth.json) |",
              f"| pseudolabel (in process, {e['world']['images']} train images) | {e['phases_s']['pseudolabel']:.0f} | "
              f"{1e3 * e['measured_cpu']['label_cpu_s_per_image']:.1f} ms/image read + preprocess + write on one core "
              f"(wall time on the shared machine) over {GPU.label_threads} threads; "
              f"model {lab['gflop_per_image']:.1f} GFLOP, {lab['ops_per_image']:.0f} kernels per image |",
              f"| process start-up | {PROCESS_STARTUP_S:.0f} | assumed: imports, CUDA context, labeler load |",
              f"| prepare-gt | {e['phases_s']['prepare-gt']:.0f} | {1e3 * e['measured_cpu']['gt_s_per_sample']:.1f} ms/sample on "
              f"{GPU.gt_workers} processes + {e['measured_cpu']['gt_pool_startup_s']:.0f} s start-up (prepare_gt.json) |",
              f"| one pretraining ({plan.pretrain_steps} steps) | {r['pretrain']:.0f} | |",
              f"| one fine-tuning ({plan.finetune_steps} steps) | {r['finetune']:.0f} | |",
              f"| one from-scratch run ({plan.baseline_steps} steps) | {r['scratch']:.0f} | |",
              f"| one evaluation ({e['world']['val_samples']} samples) | {r['eval']:.0f} | {m['eval_ops_per_batch']} kernels per batch |",
              f"| **--seeds {e['seeds']} at 50% and 100%** | **{e['headline_s']:.0f}** | shared phases + per seed: "
              f"pretrain, 2 fine-tunings, 2 from scratch, 5 evaluations |",
              f"| + 10% and 25% for every seed | {e['with_10_25_s']:.0f} | |", "",
              f"`--time-budget {TIME_BUDGET_S}` (make bench-paper-gpu) stops before a run predicted to end later: "
              f"at this estimate the headline rows {'fit' if e['headline_s'] <= TIME_BUDGET_S else 'do NOT fit'}, and the "
              f"10% and 25% rows run while time is left.", "",
              "Launches bound these steps, not FLOPs: the model is small for an H200 (a bigger model would cost "
              "little more time per step), and the estimate is as uncertain as the 10 us per launch.", ""]
    atomic_write_text(RESULTS / "paper-gpu-estimate.md", "\n".join(lines))
    atomic_write_text(RESULTS / "paper-gpu-estimate.json", json.dumps(e, indent=2))
    print("\n".join(lines))


def main() -> int:
    plan = PLANS["gpu"]
    with tempfile.TemporaryDirectory(prefix="paper-gpu-estimate-") as tmp:
        root = Path(tmp)
        measured = build_world(root, plan)
        lab = labeler_costs(plan, root)
        train = training_costs(plan, root)
    write(estimate(measured, lab, train))
    return 0


if __name__ == "__main__":
    sys.exit(main())
