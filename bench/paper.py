"""The label-efficiency table of the paper on the synthetic world (issue 7).

For BEV-label fractions 10/25/50/100% it fine-tunes from the pretrained model and trains from
scratch with the same step budget, over several seeds, and reports mean ± std val mIoU and the
wall time of every phase. Ablations: pretraining without the temporal loss (with it, for a plan
that pretrains without it), pretraining on
perfect pseudo-labels (the synthetic image GT, `synth-gt`) instead of the shipped Mask2Former's
(separates labeler error from the method), for a plan that reprojects into the adjacent
keyframes' cameras too (``label_adjacent``) the paper's loss without them, and pretraining only
(zero BEV labels).

It runs on the ``paper`` plan's world by default: 60 scenes x 4 keyframes (48 train / 12 val),
larger in scenes than the demo's 10 (so that half of the training scenes still covers the world's
variety), with about as many images. ``--plan long`` is the same world with twice the baseline's
steps (the 1800-step baseline still rises) and a longer pretraining without the temporal loss
(``make bench-paper-long``).

Budget rules: pretraining gets the plan's ``pretrain_steps`` (at ``pretrain_lr``), every
fine-tuning run from the pretrained model the plan's ``finetune_steps`` (at ``finetune_lr``),
every from-scratch run at every fraction the plan's
``baseline_steps`` (at the preset's lr); the pretraining
budget is counted into the pretrained rows' total time. Runs go in order of importance (50% and
100% over all seeds, then 10% and 25%, then the ablations at 50%) and the tables are rewritten
after every run, so a stopped run leaves a partial table (marked as such).

    .venv/bin/python bench/paper.py [--plan paper|long|default|quick|gpu] [--fractions 0.5,1.0] [--seeds 3]
        [--other-fraction-seeds N] [--ablation-seeds N] [--out DIR] [--results DIR]
        [--time-budget S] [--steps-scale F] [--rehearse toy|small]

Everything is resumable (rerun the same command); results go to bench/results/paper.json and
paper.md (plan ``paper``) or paper-PLAN.json/.md (other plans; ``--results DIR`` elsewhere).

``--plan gpu`` runs on one CUDA GPU (bevctl.demo.GPU: the labeler in this process, no Ray):
a 240-scene world, the ``demo-gpu`` model at 225x400, batch 16, AMP (bf16); the headline arms
over 3 seeds in about 6.3 minutes of an H200 (estimate: bench/paper_gpu_estimate.py), 10% and
25% while ``--time-budget`` allows (``make bench-paper-gpu``).
``--time-budget S`` stops before a run that would end more than S seconds after the start
(predicted from the runs so far) and leaves the partial table. ``--rehearse toy|small`` runs a
plan's exact code path on the CPU at a reduced size (world, images, steps, batch), into its own
working directory and results (paper-PLAN-rehearsal-SIZE): the fast test runs ``toy``. On 2 CPU cores the paper plan
with 3 seeds takes about an hour, the long plan (``make bench-paper-long``: 50% and 100% over 5
seeds, 10% and 25% over 3) about two hours and a quarter: run them as their own targets
(``make bench-paper``, ``make bench-paper-long``), not inside ``make bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bevctl.demo import CPU, GPU, PLANS, DemoPlan, Paths, PhaseLog, Runtime, evaluate_phase, prepare_data, train_phase  # noqa: E402
from bevctl.errors import BevctlError  # noqa: E402
from bevctl.io import atomic_write_text  # noqa: E402
from bevctl.train.config import load_train_config  # noqa: E402
from bevctl.train.build import resolve  # noqa: E402

FRACTIONS = (0.1, 0.25, 0.5, 1.0)
# --rehearse: a plan at reduced size on the CPU (the same phases and runtime choices except the
# device). small: the plan's own model and labeler at 112x200, a few minutes. toy: seconds, for the
# fast test: the CPU demo model (the GPU model's 3 encoder layers over 64x32 queries take seconds
# per step on a CPU whatever the image size) and the perfect stand-in labeler (the shipped one
# resizes every image to 224 rows: ~0.2 s per image on a CPU).
REHEARSALS: dict[str, dict[str, Any]] = {
    "toy": dict(scenes=5, samples_per_scene=2, image_hw=(48, 88), label_hw=(24, 44), model_image_hw=(48, 88),
                train_config="demo", labeler="synth-gt", pretrain_steps=1, finetune_steps=1, baseline_steps=4,
                batch_size=2, num_workers=0),
    "small": dict(scenes=10, samples_per_scene=3, image_hw=(112, 200), label_hw=(56, 100),
                  model_image_hw=(112, 200), pretrain_steps=8, finetune_steps=4, baseline_steps=24,
                  batch_size=2, num_workers=1),
}
# the CPU stand-in of a plan's runtime in a rehearsal: the labeler in this process (no Ray) as on a GPU
REHEARSAL_RUNTIME = dataclasses.replace(CPU, label_workers=0, eval_workers=0, synth_workers=1)


class OutOfTime(Exception):
    """The next run would end past --time-budget."""


class Budget:
    """Wall-clock budget of the whole command: a run starts only if it is predicted to end in
    time. The prediction is the run's steps times the seconds per step of the last finished run
    of its kind (of any kind before that; none before the first run), plus the last evaluation."""

    def __init__(self, seconds: float | None) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds
        self.per_step: dict[str, float] = {}  # kind -> seconds per step of its last run
        self.eval_seconds = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def predict(self, kind: str, steps: int) -> float:
        rate = self.per_step.get(kind, max(self.per_step.values(), default=0.0))
        return rate * steps + self.eval_seconds

    def check(self, run: str, kind: str, steps: int) -> None:
        if self.seconds is None:
            return
        predicted = self.predict(kind, steps)
        if self.elapsed() + predicted > self.seconds:
            raise OutOfTime(f"stopped by --time-budget {self.seconds:.0f} s before run {run}: "
                            f"{self.elapsed():.0f} s elapsed, predicted {predicted:.0f} s for it")

    def trained(self, kind: str, steps: int, seconds: float) -> None:
        self.per_step[kind] = seconds / max(steps, 1)


def runtime_for(plan_name: str, rehearse: str | None) -> Runtime:
    if rehearse:
        return REHEARSAL_RUNTIME
    if plan_name == "gpu":
        if not torch.cuda.is_available():
            raise BevctlError("--plan gpu needs a CUDA GPU (torch.cuda.is_available() is False); "
                              "--rehearse toy|small runs the same code path on the CPU at a reduced size")
        return GPU
    return CPU


def hardware(runtime: Runtime) -> str:
    """One line naming what the runs ran on (the markdown table's time columns depend on it)."""
    cores = f"{os.cpu_count()} cores"
    if runtime.device == "cuda":
        return (f"{torch.cuda.get_device_name(0)}, {cores}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                f"AMP bf16 (TrainConfig.amp auto)")
    return f"CPU ({platform.machine()}, {cores}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), torch {torch.__version__}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def results_stem(plan: str, rehearse: str | None = None) -> str:
    """bench/results/<stem>.json/.md and the default working directory <stem>-run."""
    stem = "paper" if plan == "paper" else f"paper-{plan}"
    return f"{stem}-rehearsal-{rehearse}" if rehearse else stem


def budget_rule(plan: DemoPlan) -> str:
    ratio = (plan.pretrain_steps + plan.finetune_steps) / plan.baseline_steps
    return (f"pretrain {plan.pretrain_steps} + fine-tune {plan.finetune_steps} steps = {ratio:.2f}x the "
            f"{plan.baseline_steps} steps of every from-scratch run (the rule: <= 0.5x; time ratios measured below)")


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, base_plan: Any, phases: PhaseLog,
                  complete: bool, hw: str, stopped: str | None = None) -> None:
    """Aggregate the runs so far into <results>/<stem>.json + <stem>.md (atomically)."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["name"], r["fraction"], r["pretraining"]), []).append(r)
    table = []
    for (name, fraction, kind), rs in groups.items():
        m, s = _mean_std([r["miou"] for r in rs])
        walls = [sum(r["wall_seconds"].values()) for r in rs]
        table.append({"name": name, "fraction": fraction, "pretraining": kind, "seeds": len(rs),
                      "miou_mean": m, "miou_std": s, "wall_seconds_mean": statistics.fmean(walls),
                      "wall_seconds_per_phase": {p: statistics.fmean(r["wall_seconds"].get(p, 0.0) for r in rs)
                                                 for p in {p for r in rs for p in r["wall_seconds"]}}})
    table.sort(key=lambda t: (t["fraction"], t["pretraining"] == "none", t["pretraining"]))
    # Paired by seed (the seed also picks the labelled scenes, which moves mIoU a lot): the
    # pretrained row minus scratch at the same fraction, and minus scratch at 100%.
    miou = {(r["name"], r["pretraining"], r["seed"]): r["miou"] for r in rows}
    for t in table:
        for key, ref_name in (("delta_vs_scratch_same_fraction", f"scratch {100 * t['fraction']:.0f}%"),
                              ("delta_vs_scratch_100", "scratch 100%")):
            diffs = [miou[(t["name"], t["pretraining"], sd)] - miou[(ref_name, "none", sd)]
                     for (n, k, sd) in miou if n == t["name"] and k == t["pretraining"]
                     and (ref_name, "none", sd) in miou]
            t[key] = _mean_std(diffs) + (len(diffs),) if diffs and t["pretraining"] != "none" else None
    result = {"complete": complete, "stopped": stopped, "rehearsal": args.rehearse, "hardware": hw,
              "plan": dataclasses.asdict(base_plan), "budget_rule": budget_rule(base_plan),
              "command": " ".join(["python", "bench/paper.py", *sys.argv[1:]]),
              "shared_wall_seconds": {p: phases.seconds(p) for p in phases.data if not p.startswith(("train:", "eval:"))},
              "rows": table, "runs": rows}
    results_dir = args.results
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(args.plan, args.rehearse)
    atomic_write_text(results_dir / f"{stem}.json", json.dumps(result, indent=2))
    model_hw = "x".join(str(v) for v in resolve(load_train_config(base_plan.train_config,
                                                                  image_hw=base_plan.model_image_hw)).image_hw)
    lines = ["# Label efficiency on the synthetic world", "",
             *([f"**Rehearsal at a reduced size ({args.rehearse}) on the CPU: it checks the code path, "
                "its numbers are no result.**", ""] if args.rehearse else []),
             *([] if complete else [f"**Partial results: {stopped or 'the run has not finished'}.**", ""]),
             f"`{result['command']}`; plan `{args.plan}`: {base_plan.scenes} scenes x {base_plan.samples_per_scene} "
             f"keyframes at {base_plan.image_hw[0]}x{base_plan.image_hw[1]}, training preset `{base_plan.train_config}` "
             f"(model input {model_hw}), batch {base_plan.batch_size}; {result['budget_rule']}. "
             f"Val mIoU % (mean ± std over seeds), wall seconds on {hw}.", "",
             "Shared phases (once for every row): " + ", ".join(
                 f"{p} {v:.0f} s" for p, v in result["shared_wall_seconds"].items()) + ".", "",
             "| model | BEV labels | pretraining | seeds | mIoU % | pretrain s | fine-tune s | total train s "
             "| time vs scratch 100% | Δ vs scratch, same labels (pp, paired) | Δ vs scratch 100% (pp, paired) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = next((t["wall_seconds_mean"] for t in table if t["name"] == "scratch 100%"), None)

    def delta(d: tuple[float, float, int] | None) -> str:
        return "" if d is None else f"{100 * d[0]:+.1f} ± {100 * d[1]:.1f} (n={d[2]})"

    for t in table:
        phase = t["wall_seconds_per_phase"]
        ratio = f"{t['wall_seconds_mean'] / ref:.2f}x" if ref else "n/a"
        lines.append(f"| {t['name']} | {100 * t['fraction']:.0f}% | {t['pretraining']} | {t['seeds']} | "
                     f"{100 * t['miou_mean']:.1f} ± {100 * t['miou_std']:.1f} | {phase.get('pretrain', 0.0):.0f} | "
                     f"{phase.get('finetune', 0.0):.0f} | {t['wall_seconds_mean']:.0f} | {ratio} | "
                     f"{delta(t['delta_vs_scratch_same_fraction']) if t['fraction'] > 0 else ''} | "
                     f"{delta(t['delta_vs_scratch_100'])} |")
    seeds = sorted({r["seed"] for r in rows})
    lines += ["", "Per seed (val mIoU %; the seed picks the initialisation, the data order and the labelled scenes):",
              "", "| model | BEV labels | pretraining | " + " | ".join(f"seed {sd}" for sd in seeds) + " |",
              "|---|---|---|" + "---|" * len(seeds)]
    for t in table:
        cells = [f"{100 * miou[(t['name'], t['pretraining'], sd)]:.1f}" if (t["name"], t["pretraining"], sd) in miou
                 else "" for sd in seeds]
        lines.append(f"| {t['name']} | {100 * t['fraction']:.0f}% | {t['pretraining']} | " + " | ".join(cells) + " |")
    atomic_write_text(results_dir / f"{stem}.md", "\n".join(lines) + "\n")
    if complete or stopped:
        print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="paper", choices=sorted(PLANS),
                    help="world size, step budgets and learning rates (bevctl.demo.PLANS; default: paper)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 per row (default: 3)")
    ap.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS),
                    help="comma-separated BEV-label fractions of the training scenes (default: 0.1,0.25,0.5,1.0)")
    ap.add_argument("--no-ablations", action="store_true",
                    help="skip the ablations (the temporal loss off, or on for a plan without it; perfect "
                         "pseudo-labels; no adjacent keyframes, for a plan with them)")
    ap.add_argument("--ablation-seeds", type=int, default=None,
                    help="run the ablations for the first N seeds only (default: all seeds)")
    ap.add_argument("--other-fraction-seeds", type=int, default=None,
                    help="run the fractions other than 50%% and 100%% for the first N seeds only (default: all seeds)")
    ap.add_argument("--out", type=Path, default=None,
                    help="working directory: world, stores, runs (default: bench/results/paper-run for the "
                         "paper plan, bench/results/paper-PLAN-run for the others)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                    help="where the tables go: RESULTS/paper[-PLAN].json and .md (default: bench/results)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="start no run predicted to end later than SECONDS after the command started; the "
                         "table so far is kept, marked partial (default: no limit)")
    ap.add_argument("--steps-scale", type=float, default=1.0, metavar="F",
                    help="multiply the plan's three step budgets by F (the budget rule holds at any F; with "
                         "another --out than an earlier run's), e.g. 0.5 where steps are slower than planned")
    ap.add_argument("--rehearse", choices=sorted(REHEARSALS), default=None,
                    help="the plan's code path on the CPU at a reduced size: toy (seconds) or small (minutes)")
    args = ap.parse_args()
    try:
        return run(args)
    except BevctlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    budget = Budget(args.time_budget)
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.out is None:
        args.out = ROOT / "bench" / "results" / f"{results_stem(args.plan, args.rehearse)}-run"
    runtime = runtime_for(args.plan, args.rehearse)
    hw = hardware(runtime)
    print(f"plan {args.plan}{f' (rehearsal {args.rehearse})' if args.rehearse else ''} on {hw}", flush=True)

    base_plan = PLANS[args.plan]
    if args.rehearse:
        base_plan = dataclasses.replace(base_plan, **REHEARSALS[args.rehearse])
    if args.steps_scale != 1.0:
        if not 0 < args.steps_scale <= 10:
            raise BevctlError(f"--steps-scale must be in (0, 10], got {args.steps_scale}")
        base_plan = dataclasses.replace(base_plan, **{k: max(1, round(getattr(base_plan, k) * args.steps_scale))
                                                      for k in ("pretrain_steps", "finetune_steps", "baseline_steps")})
    paths = Paths(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    phases = PhaseLog(args.out / "phases.json")
    # pseudo-labels of the train split only: pretraining reads no others (evaluation uses the BEV GT)
    prepare_data(base_plan, paths, phases, runtime, label_splits=("train",))
    if not args.no_ablations:
        prepare_data(dataclasses.replace(base_plan, labeler="synth-gt"), paths, phases, runtime, label_splits=("train",))

    runs: dict[str, dict[str, Any]] = {}  # run name -> result row (a rerun skips finished runs)

    def record(name: str, fraction: float, pretrained: str, seed: int, ckpt: Path, wall: dict[str, float]) -> None:
        run = ckpt.parent.name  # the run directory's name is unique
        if run in runs:
            return
        res = evaluate_phase(paths, phases, run, ckpt, runtime)
        budget.eval_seconds = phases.seconds(f"eval:{run}")
        runs[run] = {"name": name, "fraction": fraction, "pretraining": pretrained, "seed": seed,
                     "miou": res["miou"], "iou_per_class": {k: v["iou"] for k, v in res["classes"].items()},
                     "wall_seconds": wall}
        write_results(list(runs.values()), args, base_plan, phases, complete=False, hw=hw)  # a partial table survives a stop

    def train(plan: DemoPlan, name: str, kind: str, steps: int, **kw: Any) -> Path:
        """train_phase within the time budget; the budget learns each kind's seconds per step."""
        if not phases.data.get(f"train:{name}", {}).get("done"):
            budget.check(name, kind, steps)
        ckpt = train_phase(plan, paths, phases, name, steps=steps, runtime=runtime, **kw)
        budget.trained(kind, steps, phases.seconds(f"train:{name}"))
        return ckpt

    # (run prefix, labeler, temporal weight, adjacent keyframes) of each pretraining: the plan's own, then the
    # ablations: the temporal loss switched off (or, for a plan without it, on at the preset's
    # weight) and perfect pseudo-labels
    # (run names say the pretraining's settings, so a plan change never reuses another's runs)
    preset_tw = load_train_config(base_plan.train_config).temporal_weight
    plan_tw = preset_tw if base_plan.temporal_weight is None else base_plan.temporal_weight
    adj = base_plan.label_adjacent
    main_kind = ("reprojection+temporal" if plan_tw > 0 else "reprojection only") + (
        f" + adjacent keyframes ({adj})" if adj else "")
    pre = f"pretrain-adj{adj}" if adj else "pretrain"
    pretrainings = {main_kind: (pre, base_plan.labeler, None, adj)}
    if plan_tw > 0:
        pretrainings["no temporal loss"] = (f"{pre}-notemporal", base_plan.labeler, 0.0, adj)
    else:
        pretrainings["with temporal loss"] = (f"{pre}-temporal", base_plan.labeler, preset_tw, adj)
    pretrainings["perfect pseudo-labels"] = (f"{pre}-synthgt", "synth-gt", None, adj)
    if adj:  # the paper's loss: the sample's own cameras only
        pretrainings["no adjacent keyframes"] = ("pretrain", base_plan.labeler, None, 0)

    def pretrained(kind: str, seed: int) -> Path:
        plan = dataclasses.replace(base_plan, seed=seed)
        run, labeler, tw, adjacent = pretrainings[kind]
        name = f"{run}-s{seed}"
        ckpt = train(plan, name, "pretrain", plan.pretrain_steps, mode="pretrain",
                     labeler=labeler, temporal_weight=tw, label_adjacent=adjacent)
        record(f"{run} only", 0.0, kind, seed, ckpt, {"pretrain": phases.seconds(f"train:{name}")})
        return ckpt

    def finetuned(kind: str, fraction: float, seed: int) -> None:
        plan = dataclasses.replace(base_plan, seed=seed)
        tag, prefix = f"{int(round(fraction * 100))}", pretrainings[kind][0]
        init = pretrained(kind, seed)
        run = f"ft{tag}-{prefix}-s{seed}"
        last = train(plan, run, "finetune", plan.finetune_steps, mode="finetune",
                     fraction=fraction, init=init, lr=plan.finetune_lr)
        record(f"pretrain + {tag}%", fraction, kind, seed, last,
               {"pretrain": phases.seconds(f"train:{prefix}-s{seed}"), "finetune": phases.seconds(f"train:{run}")})

    def scratch(fraction: float, seed: int) -> None:
        plan = dataclasses.replace(base_plan, seed=seed)
        run = f"scratch{int(round(fraction * 100))}-s{seed}"
        last = train(plan, run, "scratch", plan.baseline_steps, mode="finetune", fraction=fraction)
        record(f"scratch {int(round(fraction * 100))}%", fraction, "none", seed, last,
               {"finetune": phases.seconds(f"train:{run}")})

    # The headline comparison (50% vs 100%) first over all seeds, then the other fractions, then the
    # ablations (at 50%): a run stopped early still has the most important rows.
    seeds = range(args.seeds)
    headline = [f for f in fractions if f in (0.5, 1.0)]
    others = [f for f in fractions if f not in (0.5, 1.0)]
    n_other = args.seeds if args.other_fraction_seeds is None else min(args.other_fraction_seeds, args.seeds)
    try:
        for group, group_seeds in ((headline, seeds), (others, range(n_other))):
            for seed in group_seeds:
                for fraction in group:
                    finetuned(main_kind, fraction, seed)
                    scratch(fraction, seed)
        if not args.no_ablations:
            n = args.seeds if args.ablation_seeds is None else min(args.ablation_seeds, args.seeds)
            for seed in range(n):
                for kind in list(pretrainings)[1:]:
                    finetuned(kind, 0.5, seed)
    except OutOfTime as e:
        print(str(e), flush=True)
        write_results(list(runs.values()), args, base_plan, phases, complete=False, hw=hw, stopped=str(e))
        return 0

    rows = list(runs.values())
    write_results(rows, args, base_plan, phases, complete=True, hw=hw)
    print(f"{budget.elapsed():.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
