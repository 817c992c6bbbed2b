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

    .venv/bin/python bench/paper.py [--plan paper|long|default|quick] [--fractions 0.5,1.0] [--seeds 3]
        [--other-fraction-seeds N] [--ablation-seeds N] [--out DIR]

Everything is resumable (rerun the same command); results go to bench/results/paper.json and
paper.md (plan ``paper``) or paper-PLAN.json/.md (other plans). On 2 CPU cores the paper plan
with 3 seeds takes about an hour, the long plan (``make bench-paper-long``: 50% and 100% over 5
seeds, 10% and 25% over 3) about two hours and a quarter: run them as their own targets
(``make bench-paper``, ``make bench-paper-long``), not inside ``make bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bevctl.demo import PLANS, Paths, PhaseLog, evaluate_phase, prepare_data, train_phase  # noqa: E402
from bevctl.io import atomic_write_text  # noqa: E402
from bevctl.train.config import load_train_config  # noqa: E402

FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def results_stem(plan: str) -> str:
    """bench/results/<stem>.json/.md and the default working directory <stem>-run."""
    return "paper" if plan == "paper" else f"paper-{plan}"


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, base_plan: Any, phases: PhaseLog,
                  complete: bool) -> None:
    """Aggregate the runs so far into bench/results/<stem>.json + <stem>.md (atomically)."""
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
    result = {"complete": complete, "plan": dataclasses.asdict(base_plan), "command": " ".join(["python", "bench/paper.py", *sys.argv[1:]]),
              "shared_wall_seconds": {p: phases.seconds(p) for p in phases.data if not p.startswith(("train:", "eval:"))},
              "rows": table, "runs": rows}
    results_dir = ROOT / "bench" / "results"
    stem = results_stem(args.plan)
    atomic_write_text(results_dir / f"{stem}.json", json.dumps(result, indent=2))
    lines = ["# Label efficiency on the synthetic world", "",
             *([] if complete else ["**Partial results: the run has not finished.**", ""]),
             f"`{result['command']}`; plan `{args.plan}`: {base_plan.scenes} scenes x {base_plan.samples_per_scene} "
             f"keyframes, pretrain {base_plan.pretrain_steps} steps, fine-tune {base_plan.finetune_steps}, "
             f"from scratch {base_plan.baseline_steps}; val mIoU % (mean ± std over seeds), wall seconds (2-core CPU).", "",
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
    if complete:
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
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.out is None:
        args.out = ROOT / "bench" / "results" / f"{results_stem(args.plan)}-run"

    base_plan = PLANS[args.plan]
    paths = Paths(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    phases = PhaseLog(args.out / "phases.json")
    prepare_data(base_plan, paths, phases)
    if not args.no_ablations:
        prepare_data(dataclasses.replace(base_plan, labeler="synth-gt"), paths, phases)

    runs: dict[str, dict[str, Any]] = {}  # run name -> result row (a rerun skips finished runs)

    def record(name: str, fraction: float, pretrained: str, seed: int, ckpt: Path, wall: dict[str, float]) -> None:
        run = ckpt.parent.name  # the run directory's name is unique
        if run in runs:
            return
        res = evaluate_phase(paths, phases, run, ckpt)
        runs[run] = {"name": name, "fraction": fraction, "pretraining": pretrained, "seed": seed,
                     "miou": res["miou"], "iou_per_class": {k: v["iou"] for k, v in res["classes"].items()},
                     "wall_seconds": wall}
        write_results(list(runs.values()), args, base_plan, phases, complete=False)  # a partial table survives a stop

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
        ckpt = train_phase(plan, paths, phases, name, mode="pretrain", steps=plan.pretrain_steps,
                           labeler=labeler, temporal_weight=tw, label_adjacent=adjacent)
        record(f"{run} only", 0.0, kind, seed, ckpt, {"pretrain": phases.seconds(f"train:{name}")})
        return ckpt

    def finetuned(kind: str, fraction: float, seed: int) -> None:
        plan = dataclasses.replace(base_plan, seed=seed)
        tag, prefix = f"{int(round(fraction * 100))}", pretrainings[kind][0]
        init = pretrained(kind, seed)
        run = f"ft{tag}-{prefix}-s{seed}"
        last = train_phase(plan, paths, phases, run, mode="finetune", steps=plan.finetune_steps,
                           fraction=fraction, init=init, lr=plan.finetune_lr)
        record(f"pretrain + {tag}%", fraction, kind, seed, last,
               {"pretrain": phases.seconds(f"train:{prefix}-s{seed}"), "finetune": phases.seconds(f"train:{run}")})

    def scratch(fraction: float, seed: int) -> None:
        plan = dataclasses.replace(base_plan, seed=seed)
        run = f"scratch{int(round(fraction * 100))}-s{seed}"
        last = train_phase(plan, paths, phases, run, mode="finetune", steps=plan.baseline_steps, fraction=fraction)
        record(f"scratch {int(round(fraction * 100))}%", fraction, "none", seed, last,
               {"finetune": phases.seconds(f"train:{run}")})

    # The headline comparison (50% vs 100%) first over all seeds, then the other fractions, then the
    # ablations (at 50%): a run stopped early still has the most important rows.
    seeds = range(args.seeds)
    headline = [f for f in fractions if f in (0.5, 1.0)]
    others = [f for f in fractions if f not in (0.5, 1.0)]
    n_other = args.seeds if args.other_fraction_seeds is None else min(args.other_fraction_seeds, args.seeds)
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

    rows = list(runs.values())
    write_results(rows, args, base_plan, phases, complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
