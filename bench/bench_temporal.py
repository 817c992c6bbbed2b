"""Over-smoothing vs temporal-loss weight: pretrain the toy IPM model on perfect pseudo-labels
with several ``temporal_weight`` values and report val mIoU, ped_crossing IoU, and the mean
prediction entropy / foreground fraction of the last 20 steps.

    .venv/bin/python bench/bench_temporal.py --dataroot D --version V --labels labels.zarr --gt gt.zarr
Writes bench/results/temporal_weight.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from bevctl.train.config import TrainConfig
from bevctl.train.evaluate import evaluate
from bevctl.train.loop import RunSpec, train

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataroot", required=True)
    ap.add_argument("--version", default="v1.0-synth")
    ap.add_argument("--labels", required=True)
    ap.add_argument("--gt", required=True)
    ap.add_argument("--weights", default="0,0.1,1,10")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    tmp = Path(tempfile.mkdtemp())
    for tw in (float(w) for w in args.weights.split(",")):
        run = tmp / f"tw{tw}"
        cfg = TrainConfig(model="toy", grid="demo", batch_size=2, epochs=1000, max_steps=args.steps, lr=3e-3,
                          warmup_steps=10, num_workers=1, temporal_weight=tw, checkpoint_every=10**6,
                          label_hw=(56, 100), seed=0)
        train(RunSpec(mode="pretrain", cfg=cfg, run_dir=run, dataroot=args.dataroot, version=args.version,
                      labels=args.labels, device="cpu", progress=False))
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-20:]
        r = evaluate(run / "last.pt", args.dataroot, args.version, "val", args.gt, device="cpu", num_workers=0,
                     progress=False, temporal=False)
        out[str(tw)] = {"val_miou": r["miou"], "ped_crossing_iou": r["classes"]["ped_crossing"]["iou"],
                        "pred_entropy": sum(x["pred_entropy"] for x in rows) / len(rows),
                        "pred_fg_frac": sum(x["pred_fg_frac"] for x in rows) / len(rows)}
        print(tw, out[str(tw)], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "temporal_weight.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Temporal-loss weight vs over-smoothing (toy model, perfect pseudo-labels, "
             f"{args.steps} steps)", "", "| temporal_weight | val mIoU % | ped_crossing IoU % | pred entropy (nats) "
             "| predicted fg fraction |", "|---:|---:|---:|---:|---:|"]
    for tw, v in out.items():
        lines.append(f"| {tw} | {100 * v['val_miou']:.1f} | {100 * v['ped_crossing_iou']:.1f} | "
                     f"{v['pred_entropy']:.2f} | {v['pred_fg_frac']:.3f} |")
    (RESULTS / "temporal_weight.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
