"""Cost model: bevctl on nuScenes v1.0-trainval at 8, 32 and 128 GPUs (docs/scaling.md).

Computes, from the benchmark results in bench/results/*.json (measured on CPU) and the GPU
assumptions below (stated, not measured: no GPU was available), the hours of every phase, the
store sizes, the storage / network throughput each phase needs so that storage is never the
bottleneck, and where the design stops scaling. It only computes (well under a second).

Results: bench/results/cost_model.json and cost_model.md. Change an assumption and rerun.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bevctl.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GPU_RESULTS = RESULTS / "gpu.json"  # bench/gpu_check.py on one GPU; absent until it has run
CONFIGS = ROOT / "configs" / "nuscenes"
GPUS = (8, 32, 128)
GPUS_PER_NODE = 8

# nuScenes v1.0-trainval (850 scenes of ~20 s; cameras at ~12 Hz; keyframes at 2 Hz)
SCENES, SCENE_S, CAMERA_HZ, CAMERAS = 850, 20, 12, 6
KEYFRAMES, TRAIN_KEYFRAMES, VAL_KEYFRAMES = 34_149, 28_130, 6_019
SWEEP_FRAMES = SCENES * SCENE_S * CAMERA_HZ  # 204,000 frames per camera, keyframes included
LABEL_STORE_HW = (450, 800)  # the recipe's --resolution (README)
BATCH_IMAGES = 6  # --batch-size of the labelling job: one report per 6 images


@dataclass(frozen=True)
class Assumption:
    value: float
    unit: str
    basis: str


ASSUMPTIONS: dict[str, Assumption] = {
    "labeler_img_s_per_gpu": Assumption(
        8.0, "images/s", "Mask2Former Swin-L (Mapillary Vistas) at 450x800 on one A100-class GPU, fp16, batch 6: "
        "the README's planning figure, not measured here (no GPU)"),
    "bevformer_base_ref_hours": Assumption(
        56.0, "h", "BEVFormer-base, 24 epochs on 8 x A100 (its authors: fundamentalvision/BEVFormer issue #101); "
        "4-frame queue = 3 history forwards + 1 forward/backward (~3 forwards) = 6 forward units per sample"),
    "bevctl_forward_units_pretrain": Assumption(
        4.0, "forward units", "bevctl: 1 history forward (no grad) + forward/backward (~3) per sample"),
    "bevctl_forward_units_finetune": Assumption(3.0, "forward units", "fine-tuning is frame by frame: forward/backward"),
    "real_mask_complexity": Assumption(
        3.0, "x synthetic", "bytes per mask of real street scenes (~65 Vistas classes, clutter) vs the synthetic "
        "world; check with `bevctl labels stats` on the first real images"),
    "real_confidence_complexity": Assumption(1.5, "x synthetic", "same, for confidence maps (already noisy)"),
    "real_gt_raster_factor": Assumption(5.0, "x synthetic", "nuScenes map-expansion layers are denser than the synthetic map"),
    "cpu_cores_per_gpu": Assumption(12.0, "cores", "an 8-GPU node with 96+ cores"),
    "node_nic_gbit_s": Assumption(200.0, "Gbit/s", "inter-node network per 8-GPU node (one HDR InfiniBand / 200 GbE port)"),
    "allreduce_exposed": Assumption(0.5, "fraction", "share of the gradient all-reduce not hidden behind backward (DDP buckets)"),
    "driver_ms_per_report": Assumption(
        1.0, "ms", "the labelling driver's Python work per batch report (ray.wait over outstanding refs, ray.get "
        "of a small inline result, bookkeeping)"),
    "object_store_put_per_s": Assumption(
        3500.0, "PUT/s", "S3's documented rate per partitioned key prefix (GET: 5,500/s)"),
}


def _load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} missing: run `python bench/bench_{name}.py` first (or `make bench`)")
    return json.loads(path.read_text())


def measured_inputs() -> dict[str, Any]:
    """The numbers the model uses from the CPU benchmarks, with where each comes from."""
    pl, ci, gt, model = _load("pseudolabel"), _load("cluster_inputs"), _load("prepare_gt"), _load("model")
    scaling8 = next(r for r in pl["scaling"] if r["actors"] == 8)
    mask = next(r for r in ci["label_bytes"] if r["labeler"].startswith("bevctl-synth")
                and tuple(r["store_hw"]) == LABEL_STORE_HW)
    gt_row = next(r for r in gt["rows"] if r["grid"] == "hdmapnet" and r["class_set"] == "hdmapnet")
    presets = {r["preset"]: r for r in model["runs"] if r["grid"] == "hdmapnet" and not r["overrides"]}
    epochs = {name: yaml.safe_load((CONFIGS / f"{name}_small.yaml").read_text()) for name in
              ("pretrain", "finetune", "baseline")}
    return {
        "pipeline_efficiency": pl["efficiency"]["efficiency"],  # end-to-end / model-only, 1 actor
        "actor_scaling_efficiency_8": scaling8["efficiency_vs_1"],
        "mask_bytes_synthetic": mask["mask_bytes"],
        "confidence_bytes_synthetic": mask["confidence_bytes"],
        "jpeg_bytes": ci["decode"]["jpeg_bytes_synthetic"],
        "decode_ms": {k.split()[0]: v for k, v in ci["decode"]["ms"].items()},
        "gt_rasterise_ms": gt_row["rasterise_ms_per_sample"],
        "gt_kib_per_sample": gt_row["store_kib_per_sample"],
        "params": {p: presets[p]["params"]["total"] for p in ("small", "base")},
        "forward_gflop": {p: presets[p]["forward_gflop"] for p in ("small", "base")},
        "epochs": {k: int(v["epochs"]) for k, v in epochs.items()},
        "fraction": {k: float(v.get("fraction", 1.0)) for k, v in epochs.items()},
        "checkpoint_every": int(epochs["pretrain"]["checkpoint_every"]),
        "warmup_steps": int(epochs["pretrain"]["warmup_steps"]),
    }


def gpu_measurements(path: Path = GPU_RESULTS) -> dict[str, Any] | None:
    """The figures of a full ``bench/gpu_check.py`` run (one GPU) that replace GPU assumptions:
    ``labeler_img_s_per_gpu`` (the Swin-L labeler end to end in one process) and
    ``s_per_sample[preset][mode]``; None without such a run (smoke runs do not count)."""
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    if r.get("mode") != "full":
        return None

    def ok(name: str) -> dict[str, Any] | None:
        entry = r.get("steps", {}).get(name, {})
        return entry.get("result") if entry.get("status") == "ok" else None

    out: dict[str, Any] = {"gpu": r.get("env", {}).get("gpu"), "s_per_sample": {}}
    if lab := ok("labeler_mask2former"):
        out["labeler_img_s_per_gpu"] = float(lab["images_per_s"])
    for preset in ("small", "base"):
        for mode in ("pretrain", "finetune"):
            if run := ok(f"{mode}_{preset}"):
                out["s_per_sample"].setdefault(preset, {})[mode] = float(run["s_per_step"]) / int(run["batch_size"])
    return out


def seconds_per_sample(m: dict[str, Any], a: dict[str, float]) -> dict[str, dict[str, float]]:
    """GPU seconds per training sample at batch 1, per preset and phase."""
    ref = a["bevformer_base_ref_hours"] * 3600 * 8 / (24 * TRAIN_KEYFRAMES)  # per sample, 6 units
    unit_base = ref / 6
    out = {}
    for preset in ("small", "base"):
        unit = unit_base * m["forward_gflop"][preset] / m["forward_gflop"]["base"]
        out[preset] = {"pretrain": unit * a["bevctl_forward_units_pretrain"],
                       "finetune": unit * a["bevctl_forward_units_finetune"], "evaluate": unit}
    return out


def compute(gpu_json: Path = GPU_RESULTS) -> dict[str, Any]:
    m = measured_inputs()
    a = {k: v.value for k, v in ASSUMPTIONS.items()}
    sps = seconds_per_sample(m, a)
    gpu = gpu_measurements(gpu_json)
    if gpu:  # measured on one GPU: these replace the assumptions (evaluation = 1 of fine-tuning's 3 forward units)
        for preset, modes in gpu["s_per_sample"].items():
            sps[preset].update(modes)
            if "finetune" in modes:
                sps[preset]["evaluate"] = modes["finetune"] / a["bevctl_forward_units_finetune"]
        if "labeler_img_s_per_gpu" in gpu:
            a["labeler_img_s_per_gpu"] = gpu["labeler_img_s_per_gpu"]
            m["pipeline_efficiency"] = 1.0  # the measured rate is already end to end
    mask_b = m["mask_bytes_synthetic"] * a["real_mask_complexity"]
    conf_b = m["confidence_bytes_synthetic"] * a["real_confidence_complexity"]
    jpeg_b = m["jpeg_bytes"]
    datasets = {"keyframes": KEYFRAMES * CAMERAS, "with sweeps": SWEEP_FRAMES * CAMERAS}
    labeler_eff = m["pipeline_efficiency"] * m["actor_scaling_efficiency_8"]
    rows = []
    for data, images in datasets.items():
        frames_train = TRAIN_KEYFRAMES * images // (KEYFRAMES * CAMERAS)  # sweeps: frames of the train scenes
        for preset in ("small", "base"):
            s = sps[preset]
            grad_bytes = m["params"][preset] * 4  # fp32 gradients
            for n in GPUS:
                nodes = max(1, n // GPUS_PER_NODE)
                step_pre = s["pretrain"]
                allreduce_s = 0.0
                if nodes > 1:  # ring/tree all-reduce: ~2 x gradient bytes through every node's NIC per step
                    allreduce_s = 2 * grad_bytes * 8 / (a["node_nic_gbit_s"] * 1e9)
                exposed = a["allreduce_exposed"] * allreduce_s
                img_s = n * a["labeler_img_s_per_gpu"] * labeler_eff
                pre_samples_s = n / (step_pre + exposed)
                fin_samples_s = n / (s["finetune"] + exposed)
                hours = {
                    "pseudolabel": images / img_s / 3600,
                    "prepare_gt": KEYFRAMES * m["gt_rasterise_ms"] * a["real_gt_raster_factor"] / 1e3
                    / (a["cpu_cores_per_gpu"] * GPUS_PER_NODE) / 3600,  # one node's cores (a local pool)
                    "pretrain": frames_train * m["epochs"]["pretrain"] / pre_samples_s / 3600,
                    "finetune": TRAIN_KEYFRAMES * m["fraction"]["finetune"] * m["epochs"]["finetune"]
                    / fin_samples_s / 3600,
                    "baseline": TRAIN_KEYFRAMES * m["epochs"]["baseline"] / fin_samples_s / 3600,
                    "evaluate": VAL_KEYFRAMES * s["evaluate"] / 3600,  # one process
                }
                hours["total (pretrain path)"] = sum(hours[k] for k in ("pseudolabel", "prepare_gt", "pretrain",
                                                                        "finetune", "evaluate"))
                decode_ms = m["decode_ms"][preset]
                rows.append({
                    "data": data, "preset": preset, "gpus": n, "nodes": nodes, "hours": hours,
                    "pseudolabel": {
                        "images_s": img_s, "read_MB_s": img_s * jpeg_b / 1e6, "write_MB_s": img_s * (mask_b + conf_b) / 1e6,
                        "read_ops_s": img_s, "write_ops_s": 2 * img_s,  # one mask + one confidence chunk per image
                        "driver_reports_s": img_s / BATCH_IMAGES,
                        "driver_busy": img_s / BATCH_IMAGES * a["driver_ms_per_report"] / 1e3,
                    },
                    "pretrain": {
                        "samples_s": pre_samples_s,
                        # 6 images of the frame + 6 of the previous one, 6 masks + 6 confidence maps
                        "read_MB_s": pre_samples_s * (12 * jpeg_b + 6 * (mask_b + conf_b)) / 1e6,
                        "read_ops_s": pre_samples_s * 24,
                        "decode_cores_per_gpu": pre_samples_s / n * 12 * decode_ms / 1e3,
                        "steps_per_epoch": frames_train / n,
                        "allreduce_s_per_step": allreduce_s, "step_s": step_pre + exposed,
                        "nic_Gbit_s_needed": (2 * grad_bytes * 8 / (step_pre + exposed) / 1e9) if nodes > 1 else 0.0,
                    },
                    "finetune": {
                        "samples_s": fin_samples_s,
                        "read_MB_s": fin_samples_s * (6 * jpeg_b + m["gt_kib_per_sample"] * 1024) / 1e6,
                        "steps_per_epoch": TRAIN_KEYFRAMES * m["fraction"]["finetune"] / n,
                    },
                })
    stores = {data: {"labels_GB": images * (mask_b + conf_b) / 1e9, "labels_masks_only_GB": images * mask_b / 1e9,
                     "label_chunk_files": 2 * images} for data, images in datasets.items()}
    stores["gt_MB"] = KEYFRAMES * m["gt_kib_per_sample"] * 1024 / 1e6
    stores["checkpoint_GB"] = {p: m["params"][p] * 12 / 1e9 for p in ("small", "base")}  # fp32 weights + Adam
    limits = {
        "driver_max_gpus": 1e3 / a["driver_ms_per_report"] * BATCH_IMAGES / (a["labeler_img_s_per_gpu"] * labeler_eff),
        "object_store_max_gpus_one_prefix": a["object_store_put_per_s"] / (2 * a["labeler_img_s_per_gpu"] * labeler_eff),
        "object_store_max_gpus_sharded_per_sample": a["object_store_put_per_s"] * CAMERAS
        / (2 * a["labeler_img_s_per_gpu"] * labeler_eff),
    }
    return {"assumptions": {k: asdict(v) for k, v in ASSUMPTIONS.items()}, "measured": m, "gpu_measured": gpu,
            "seconds_per_sample": sps, "datasets_images": datasets, "bytes_per_image": {
                "mask": mask_b, "confidence": conf_b, "jpeg": jpeg_b}, "rows": rows, "stores": stores,
            "limits": limits}


def _f(x: float) -> str:
    if 0 < x < 0.005:
        return "<0.01"
    return f"{x:.2f}" if x < 10 else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def to_markdown(r: dict[str, Any]) -> str:
    m, b = r["measured"], r["bytes_per_image"]
    out = [
        "# Cost model: nuScenes v1.0-trainval (generated by bench/cost_model.py)", "",
        f"Images: {r['datasets_images']['keyframes']:,} keyframe camera images; "
        f"{r['datasets_images']['with sweeps']:,} with sweeps (6 cameras x 12 Hz x 20 s x 850 scenes). "
        f"Per image: mask {b['mask'] / 1e3:.1f} kB + confidence {b['confidence'] / 1e3:.1f} kB at 450x800, "
        f"JPEG {b['jpeg'] / 1e3:.0f} kB. GPU s per training sample (batch 1"
        + (f"; measured on one {r['gpu_measured']['gpu']} where bench/results/gpu.json has them, else assumed"
           if r.get("gpu_measured") else "; assumed, see below") + "): "
        + ", ".join(f"{p} pretrain {v['pretrain']:.2f} / finetune {v['finetune']:.2f}"
                    for p, v in r["seconds_per_sample"].items()) + ".", "",
        "## Hours per phase", "",
        "| data | model | GPUs | pseudolabel | prepare-gt | pretrain | finetune 50% | baseline 100% | evaluate | "
        "total (pretrain path) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        h = row["hours"]
        note = " *" if row["data"] != "keyframes" else ""
        out.append(f"| {row['data']} | {row['preset']} | {row['gpus']} | {_f(h['pseudolabel'])} | {_f(h['prepare_gt'])} | "
                   f"{_f(h['pretrain'])}{note} | {_f(h['finetune'])} | {_f(h['baseline'])} | {_f(h['evaluate'])} | "
                   f"{_f(h['total (pretrain path)'])} |")
    out += ["", "\\* pretraining on sweeps needs sweep frames in the data index (bevctl indexes keyframes only): "
            "a what-if, 8 epochs over every frame of the train scenes.", "",
            "## Throughput storage and network must sustain (small model)", "",
            "| data | GPUs | label img/s | label read MB/s | label write MB/s | label write ops/s | driver busy | "
            "pretrain samples/s | pretrain read MB/s | read ops/s | decode cores/GPU | steps/epoch | "
            "all-reduce NIC Gbit/s/node |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        if row["preset"] != "small":
            continue
        p, t = row["pseudolabel"], row["pretrain"]
        out.append(f"| {row['data']} | {row['gpus']} | {p['images_s']:.0f} | {_f(p['read_MB_s'])} | "
                   f"{_f(p['write_MB_s'])} | {p['write_ops_s']:.0f} | {100 * p['driver_busy']:.0f}% | "
                   f"{t['samples_s']:.0f} | {_f(t['read_MB_s'])} | {t['read_ops_s']:.0f} | "
                   f"{t['decode_cores_per_gpu']:.2f} | {t['steps_per_epoch']:.0f} | {_f(t['nic_Gbit_s_needed'])} |")
    s = r["stores"]
    out += ["", "## Stores", "",
            "| store | keyframes | with sweeps |", "|---|---:|---:|",
            f"| labels.zarr (masks + confidence) | {_f(s['keyframes']['labels_GB'])} GB | "
            f"{_f(s['with sweeps']['labels_GB'])} GB |",
            f"| labels.zarr without --confidence | {_f(s['keyframes']['labels_masks_only_GB'])} GB | "
            f"{_f(s['with sweeps']['labels_masks_only_GB'])} GB |",
            f"| label chunk files (objects) | {s['keyframes']['label_chunk_files']:,} | "
            f"{s['with sweeps']['label_chunk_files']:,} |",
            f"| gt.zarr (hdmapnet grid) | {_f(s['gt_MB'])} MB | (keyframes only) |",
            f"| one checkpoint (weights + Adam) | small {s['checkpoint_GB']['small']:.2f} GB, "
            f"base {s['checkpoint_GB']['base']:.2f} GB | |", "",
            "## Limits", ""]
    lim = r["limits"]
    out += [f"- labelling driver saturates at ~{lim['driver_max_gpus']:.0f} GPUs "
            f"({ASSUMPTIONS['driver_ms_per_report'].value:g} ms per report of {BATCH_IMAGES} images)",
            f"- object store, one key prefix: ~{lim['object_store_max_gpus_one_prefix']:.0f} GPUs of chunk PUTs; "
            f"~{lim['object_store_max_gpus_sharded_per_sample']:.0f} with one shard per sample",
            "", "## Assumptions (not measured)", "", "| name | value | basis |", "|---|---|---|"]
    out += [f"| {k} | {v.value:g} {v.unit} | {v.basis} |" for k, v in ASSUMPTIONS.items()]
    out += ["", "Measured inputs (bench/results): pipeline efficiency "
            f"{m['pipeline_efficiency']}, 8-actor scaling {m['actor_scaling_efficiency_8']}, "
            f"GT rasterise {m['gt_rasterise_ms']} ms/sample, decode ms/image {m['decode_ms']}, "
            f"params {m['params']}, forward GFLOP {{{', '.join(f'{k}: {v:.0f}' for k, v in m['forward_gflop'].items())}}}, "
            f"epochs {m['epochs']}."]
    return "\n".join(out) + "\n"


def main() -> None:
    result = compute()
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "cost_model.json", json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    atomic_write_text(RESULTS / "cost_model.md", md)
    print(md)


if __name__ == "__main__":
    main()
