"""GPU check: every GPU path of bevctl run end to end on one GPU and measured, in one command.

``python3 bench/gpu_check.py`` (= ``make gpu-check``) on a machine with one CUDA GPU runs, in
this order (most wanted figures first), through bevctl's own library functions (no copy of
their logic):

1.  ``env``: device, torch / CUDA / transformers versions, the measured bf16 matmul rate;
2.  ``synth``: a synthetic world at nuScenes image size (900x1600), written with every core;
3.  ``labeler_mask2former``: a Mask2Former of the Swin-L Mapillary Vistas checkpoint's
    architecture and size (random weights built from a config, 200 queries, the 65 Mapillary
    Vistas v1.2 class names), written with ``save_pretrained`` and labelled through the same
    local-directory path as a downloaded checkpoint, in process (``--workers 0``) on the GPU in
    half precision, ``--resolution 450x800 --confidence``: images/s, model-busy fraction, peak
    memory, FLOPs per image (torch.utils.flop_counter) and the fraction of the bf16 rate;
4.  ``labeler_synth``: the same for the shipped ``bevctl-synth`` labeler (its labels feed pretraining);
5.  ``prepare_gt``: the ``hdmapnet`` grid;
6.  ``pretrain_small`` / ``finetune_small`` / ``pretrain_base`` / ``finetune_base``: the recipe's
    configs (``configs/nuscenes``; backbone random-init) for a fixed number of steps with AMP:
    s/step, samples/s, peak memory, data-wait fraction with the config's loader workers, phase
    split (data / forward / loss / backward / optimiser), FLOPs per step and fraction of the bf16
    rate;
7.  ``amp_vs_fp32``: the first steps of ``pretrain_small`` again without AMP: losses must agree
    within :data:`AMP_LOSS_RTOL`;
8.  ``torchrun``: ``torchrun --nproc_per_node 1 -m bevctl.cli pretrain`` (NCCL) must give the
    losses of the plain run within :data:`TORCHRUN_LOSS_RTOL`;
9.  ``evaluate_visualize``: ``evaluate`` and ``visualize`` on the GPU;
10. ``gpu_tests``: ``pytest -m gpu`` (CUDA vs CPU equality tests, tests/test_gpu.py);
11. ``profile``: the top GPU kernels of a few ``small`` pretraining steps (torch.profiler);
12. ``compile``: ``pretrain_small`` with the model under ``torch.compile``: compile time,
    step-time speed-up.

It stops itself before ``--budget-s`` of wall-clock time (a step that would not fit is skipped,
a running one is stopped) and writes ``<out>/<name>.json`` and ``.md`` after every step, so a cut
run still leaves its partial results. ``--only`` / ``--skip`` pick steps; a step's inputs (world,
label store, GT store) are built on demand, so any subset runs on a fresh machine.

``--device cpu --smoke`` runs every step at tiny sizes on a CPU (a few minutes on 2 cores, mostly
imports, a torchrun subprocess and dynamo tracing; tests/test_gpu_check.py runs it, without those
three, inside ``make test``), so this script cannot rot between GPU runs.

Needs no Ray and no installed bevctl (``PYTHONPATH`` pointing at the checkout is enough).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from bevctl.config import class_set_from_name, dataclass_to_dict, grid_from_name  # noqa: E402
from bevctl.io import atomic_write_text  # noqa: E402

CONFIGS = ROOT / "configs" / "nuscenes"
MAPILLARY_MAP = ROOT / "bevctl" / "configs" / "label_maps" / "mapillary_vistas_v1.2.yaml"

# Tolerances (see docs/gpu_check.md for the reasoning).
# bf16 keeps 8 significant bits (relative rounding 2^-9 per value); the step-1 loss is a mean over
# ~10^5 pixels of a network whose activations each carry that error, so the mean moves by far
# less than 1%; later steps add the AMP-vs-fp32 difference of the updates, which at the recipe's
# warm-up learning rates (<= 1% of the peak lr over these steps) stays small. 3% flags a broken
# autocast region (a loss computed in bf16, a cast lost) while leaving room for that drift.
AMP_LOSS_RTOL = 0.03
# The same math in one process with and without a process group; on a GPU only the order of
# atomic additions (grid_sample backward, scatter) differs, ~1e-7 relative per operation.
TORCHRUN_LOSS_RTOL = 1e-3

MASK2FORMER_SWIN_L = {  # facebook/mask2former-swin-large-mapillary-vistas-semantic
    "backbone": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48], "window_size": 12,
                 "image_size": 384, "drop_path_rate": 0.3},
    "num_queries": 200,
    "head": {},  # Mask2FormerConfig defaults: hidden 256, 6 pixel-decoder layers, 10 decoder layers
}
MASK2FORMER_TINY = {  # --smoke: the same code path, seconds on a CPU
    "backbone": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 4,
                 "image_size": 64},
    "num_queries": 8,
    "head": {"feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32, "encoder_feedforward_dim": 64,
             "encoder_layers": 1, "decoder_layers": 2, "dim_feedforward": 64, "num_attention_heads": 4},
}


@dataclass(frozen=True)
class Sizes:
    scenes: int
    samples_per_scene: int
    image_hw: tuple[int, int]
    label_hw: tuple[int, int]  # pseudo-label store resolution (the recipe's --resolution)
    labeler_input_short: int  # the Mask2Former image processor's shortest_edge
    mask2former: dict
    warm_steps: int  # first steps left out of the timings (cudnn autotuning, allocator growth)
    steps: int  # timed steps after those
    compare_steps: int  # steps of the fp32 and torchrun runs compared with the AMP run
    profile_steps: int
    train_overrides: dict  # on top of the recipe's YAML (smoke: a model that fits a CPU)
    eval_workers: int
    gt_grid: str  # the grid of prepare-gt: the training configs' grid
    synth_labeler: str  # the shipped labeler (smoke: the synth-gt stand-in; the shipped one takes minutes on a CPU)
    cpu_workers: int  # synth and prepare-gt processes; 0 = every core
    streets: tuple[int, int] = (5, 5)  # the synthetic world's street grid


FULL = Sizes(scenes=4, samples_per_scene=6, image_hw=(900, 1600), label_hw=(450, 800), labeler_input_short=450,
             mask2former=MASK2FORMER_SWIN_L, warm_steps=3, steps=12, compare_steps=4, profile_steps=3,
             train_overrides={}, eval_workers=4, gt_grid="hdmapnet", synth_labeler="bevctl-synth", cpu_workers=0)
SMOKE = Sizes(scenes=2, samples_per_scene=3, image_hw=(90, 160), label_hw=(45, 80), labeler_input_short=64,
              mask2former=MASK2FORMER_TINY, warm_steps=1, steps=2, compare_steps=2, profile_steps=1,
              train_overrides={"model": "demo", "grid": "demo", "image_hw": (48, 80), "label_hw": (24, 40),
                               "num_workers": 0}, eval_workers=0, gt_grid="demo", synth_labeler="synth-gt",
              cpu_workers=1, streets=(3, 3))

# step name -> rough seconds on one H200; the order is the run order, most wanted figures first
STEP_ESTIMATE_S = {
    "env": 10, "synth": 45, "labeler_mask2former": 60, "labeler_synth": 15, "prepare_gt": 10,
    "pretrain_small": 40, "finetune_small": 35, "pretrain_base": 50, "finetune_base": 45, "amp_vs_fp32": 30,
    "torchrun": 45, "evaluate_visualize": 25, "gpu_tests": 60, "profile": 30, "compile": 120,
}
STEPS = tuple(STEP_ESTIMATE_S)


class BudgetExceeded(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise BudgetExceeded()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:400]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = SMOKE if args.smoke else FULL
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.work = Path(args.work).absolute()
        self.out = Path(args.out).absolute()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"mode": "smoke" if args.smoke else "full", "device": str(self.device),
                                        "budget_s": args.budget_s, "steps": {}}
        self.peak_rate: float | None = None  # FLOP/s of the measured matmul
        self.runs: dict[str, dict[str, Any]] = {}  # training run name -> its summary
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s

    # ---- shared inputs, built on demand --------------------------------------------------

    @property
    def dataroot(self) -> Path:
        return self.work / "world"

    version = "v1.0-synth"

    def world(self) -> Path:
        if not (self.dataroot / self.version).is_dir():
            self.step_synth()
        return self.dataroot

    def labels(self) -> Path:
        """The pseudo-labels training reads: the shipped labeler's (built if missing). The
        random-weight Swin-L's labels are noise with ~1/65 confidence, which the recipe's
        ``min_confidence: 0.5`` would mask out entirely, leaving the reprojection loss at zero."""
        store = self.work / "labels_synth.zarr"
        if not (store / "zarr.json").is_file():
            self.step_labeler_synth()
        return store

    def gt(self) -> Path:
        if not (self.work / "gt.zarr" / "zarr.json").is_file():
            self.step_prepare_gt()
        return self.work / "gt.zarr"

    def cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def rate_fraction(self, flop_per_s: float | None) -> float | None:
        if not flop_per_s or not self.peak_rate:
            return None
        return round(flop_per_s / self.peak_rate, 4)

    # ---- steps ----------------------------------------------------------------------------

    def step_env(self) -> dict[str, Any]:
        import transformers

        env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "transformers": transformers.__version__,
                               "cpu_cores": self.cores(), "host": platform.node()}
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            env.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                        "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
                        "cudnn": torch.backends.cudnn.version()})
        n, dtype = (8192, torch.bfloat16) if self.cuda else (256, torch.float32)  # CPU: no fast bf16
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        for _ in range(3):
            a @ b
        reps = 20 if self.cuda else 5
        self._sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        self._sync()
        seconds = time.perf_counter() - t0
        self.peak_rate = 2 * n**3 * reps / seconds
        env["matmul"] = {"n": n, "dtype": str(dtype).removeprefix("torch."),
                         "tflop_per_s": float(f"{self.peak_rate / 1e12:.4g}")}
        self.results["env"] = env
        return env

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def step_gpu_tests(self) -> dict[str, Any]:
        log = self.out / f"{self.args.name}-pytest.txt"
        if importlib.util.find_spec("pytest") is None:
            return {"status_note": "pytest is not installed here: tests/test_gpu.py not run"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=",
               str(ROOT / "tests" / "test_gpu.py")]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, self.remaining() - 5))
        atomic_write_text(log, proc.stdout + proc.stderr)
        last = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or [""]
        out = {"command": "python -m pytest -m gpu tests/test_gpu.py", "returncode": proc.returncode,
               "summary": last[0], "log": log.name}
        if proc.returncode not in (0, 5):  # 5: nothing collected/selected
            raise RuntimeError(f"pytest -m gpu failed: {last[0]} (see {log.name})")
        return out

    def step_synth(self) -> dict[str, Any]:
        from bevctl.data.synth import SynthConfig, write_synthetic_dataset

        s = self.sizes
        cfg = SynthConfig(scenes=s.scenes, samples_per_scene=s.samples_per_scene, image_hw=s.image_hw, seed=0,
                          version=self.version, val_fraction=0.25, workers=s.cpu_workers, chunk=2, grid=s.streets)
        t0 = time.perf_counter()
        summary = write_synthetic_dataset(cfg, self.dataroot, overwrite=True, progress=False)
        seconds = time.perf_counter() - t0
        images = s.scenes * s.samples_per_scene * 6
        out = {"scenes": s.scenes, "samples": s.scenes * s.samples_per_scene, "images": images,
               "image_hw": list(s.image_hw), "workers": s.cpu_workers or self.cores(), "seconds": round(seconds, 2),
               "images_per_s": round(images / seconds, 1)}
        out.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.results["steps"].setdefault("synth", {"status": "ok (built for a later step)", "result": out})
        return out

    def _mask2former_dir(self) -> Path:
        """A save_pretrained directory with the Swin-L Mapillary Vistas architecture (random weights)."""
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

        from bevctl.pseudolabel.labeler import quiet_transformers

        spec = self.sizes.mask2former
        names = [n for n in yaml.safe_load(MAPILLARY_MAP.read_text())["classes"] if n != "Unlabeled"]
        if len(names) != 65:
            raise RuntimeError(f"{MAPILLARY_MAP}: expected 65 Mapillary Vistas v1.2 classes, got {len(names)}")
        backbone = SwinConfig(**spec["backbone"], out_features=["stage1", "stage2", "stage3", "stage4"])
        config = Mask2FormerConfig(backbone_config=backbone, num_queries=spec["num_queries"],
                                   id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                                   **spec["head"])
        path = self.work / "mask2former-swin-large-mapillary-random"
        if path.exists():
            shutil.rmtree(path)
        torch.manual_seed(0)
        with torch.device(self.device):  # random init on the GPU: seconds instead of a minute
            model = Mask2FormerForUniversalSegmentation(config)
        self._m2f_params = sum(p.numel() for p in model.parameters())
        with quiet_transformers():  # no progress bar per shard in the log
            model.save_pretrained(str(path))
        del model
        short = self.sizes.labeler_input_short
        processor = json.loads((ROOT / "bevctl" / "assets" / "labeler-synth" / "preprocessor_config.json").read_text())
        processor["size"] = {"shortest_edge": short, "longest_edge": short * 16 // 9}  # 900x1600 -> short x 16/9 short
        atomic_write_text(path / "preprocessor_config.json", json.dumps(processor, indent=2) + "\n")
        return path

    def _label(self, model: str, store: Path) -> dict[str, Any]:
        from bevctl.data.nuscenes import load_index
        from bevctl.pseudolabel.job import PseudolabelConfig, read_image, run_pseudolabel
        from bevctl.pseudolabel.labeler import load_labeler

        dataroot = self.world()
        cfg = PseudolabelConfig(dataroot=str(dataroot), version=self.version, out=str(store), model=model,
                                workers=0, resolution=self.sizes.label_hw, confidence=True, overwrite=True,
                                progress=False)  # device "auto", as `bevctl pseudolabel --workers 0`
        self.reset_peak()
        summary = run_pseudolabel(cfg)
        out: dict[str, Any] = {k: v for k, v in summary.as_dict().items()
                               if k in ("images_labeled", "seconds", "images_per_s", "model_busy", "model_s",
                                        "decode_s", "write_s", "labeler_device", "labeler_dtype", "compression_ratio")}
        out.update({"peak_gib": self.peak_gib(), "resolution": list(self.sizes.label_hw), "batch_size": cfg.batch_size,
                    "command": f"bevctl pseudolabel --model {Path(model).name} --workers 0 --resolution "
                               f"{self.sizes.label_hw[0]}x{self.sizes.label_hw[1]} --confidence"})
        if summary.images_failed or summary.samples_done != summary.samples_total:
            raise RuntimeError(f"pseudolabel: {summary.images_failed} images failed, "
                               f"{summary.samples_done}/{summary.samples_total} samples done")
        if self.cuda and not (summary.labeler_device.startswith("cuda")
                              and summary.labeler_dtype in ("bfloat16", "float16")):
            raise RuntimeError(f"the labeler ran on {summary.labeler_device} in {summary.labeler_dtype}, "
                               "expected cuda in half precision")
        # FLOPs of one image (model + semantic map at the store resolution), counted apart
        index = load_index(str(dataroot), self.version, check_images=False)
        path = next(iter(index.samples.values())).cameras[0].image_path
        image = read_image(path)
        lab = load_labeler(model)  # device "auto", as the job's in-process worker
        hook = getattr(lab, "preprocess_file", None)  # stand-ins that read the image's file (as the job's worker)
        pre = hook(image, path) if hook is not None else lab.preprocess(image)
        with flop_counter() as counter:
            lab.predict([pre], tuple(self.sizes.label_hw), True)
        flop = counter.get_total_flops()
        out.update({"model_input_hw": list(pre.shape[-2:]), "gflop_per_image": round(flop / 1e9, 2),
                    "fraction_of_matmul_rate": self.rate_fraction(flop * summary.images_per_s)})
        del lab
        return out

    def step_labeler_mask2former(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        path = self._mask2former_dir()
        build_s = time.perf_counter() - t0
        out = self._label(str(path), self.work / "labels_mask2former.zarr")
        out.update({"params_m": round(self._m2f_params / 1e6, 1), "build_and_save_s": round(build_s, 1),
                    "architecture": {"backbone": "swin", **self.sizes.mask2former["backbone"],
                                     "num_queries": self.sizes.mask2former["num_queries"], "num_labels": 65}})
        return out

    def step_labeler_synth(self) -> dict[str, Any]:
        out = self._label(self.sizes.synth_labeler, self.work / "labels_synth.zarr")
        self.results["steps"].setdefault("labeler_synth", {"status": "ok (built for a later step)", "result": out})
        return out

    def step_prepare_gt(self) -> dict[str, Any]:
        from bevctl.storage.gt_store import prepare_gt

        dataroot = self.world()
        grid = self.sizes.gt_grid
        s = prepare_gt(dataroot, self.version, grid_from_name(grid), class_set_from_name("hdmapnet"),
                       self.work / "gt.zarr", workers=self.sizes.cpu_workers or self.cores(), overwrite=True,
                       progress=False)
        out = {"grid": grid, "samples": s.done_now, "failed": s.failed, "workers": s.workers,
               "seconds": round(s.seconds, 2), "samples_per_s": round(s.samples_per_s, 1),
               "steady_samples_per_s": round(s.steady_samples_per_s, 1)}
        if s.failed:
            raise RuntimeError(f"prepare-gt: {s.failed} samples failed ({s.errors[:1]})")
        self.results["steps"].setdefault("prepare_gt", {"status": "ok (built for a later step)", "result": out})
        return out

    # ---- training ---------------------------------------------------------------------------

    def train_config(self, mode: str, preset: str, max_steps: int, **extra: Any):
        from bevctl.train.config import load_train_config

        yaml_path = CONFIGS / f"{mode}_{preset}.yaml"
        cfg = load_train_config(str(yaml_path), max_steps=max_steps, epochs=10_000, checkpoint_every=max_steps,
                                log_every=1, **self.sizes.train_overrides, **extra)
        # random init: no download; and the comparisons below need warm-up (lr linear in the step) to cover the run
        cfg = dataclasses.replace(cfg, backbone_pretrained=None)
        if cfg.warmup_steps < max_steps:
            raise RuntimeError(f"{yaml_path}: warmup_steps {cfg.warmup_steps} < {max_steps} steps")
        return cfg

    def run_spec(self, name: str, mode: str, cfg, **kw: Any):
        from bevctl.train.loop import RunSpec

        run_dir = self.work / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        data = {"labels": str(self.labels())} if mode == "pretrain" else {"gt": str(self.gt())}
        return RunSpec(mode=mode, cfg=cfg, run_dir=run_dir, dataroot=str(self.world()), version=self.version,
                       device=str(self.device), progress=False, profile=True, **data, **kw)

    def step_flops(self, spec) -> float:
        """FLOPs of one training step (forward incl. the history frame, loss, backward) on one
        batch of the run's own dataset, with the run's autocast."""
        from bevctl.train.dataset import build_train_dataset
        from bevctl.train.build import build_model, resolve
        from bevctl.train.dataset import collate
        from bevctl.train.loop import _amp_settings
        from bevctl.train.tasks import make_task, to_device

        cfg = spec.cfg
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(self.device).train()
        dataset = build_train_dataset(spec, write_scenes=False)
        batch = to_device(collate([dataset[i] for i in range(cfg.batch_size)]), self.device)
        setup = resolve(cfg)
        task = make_task(spec.mode, cfg, setup.grid, setup.num_classes)
        amp_dtype, _ = _amp_settings(cfg, self.device)
        with flop_counter() as counter:
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _ = task(model, batch, self.device)
            loss.backward()
        del model, batch
        return float(counter.get_total_flops())

    def train_run(self, name: str, mode: str, preset: str, steps: int, flops: bool = True,
                  **extra: Any) -> dict[str, Any]:
        from bevctl.train.loop import train

        model_factory = extra.pop("model_factory", None)
        cfg = self.train_config(mode, preset, steps, **extra)
        spec = self.run_spec(name, mode, cfg, model_factory=model_factory,
                             extra={"compile_backend": self.args.compile_backend})
        flop = self.step_flops(spec) if flops else None
        self.reset_peak()
        t0 = time.perf_counter()
        train(spec)
        wall = time.perf_counter() - t0
        rows = [json.loads(ln) for ln in (Path(spec.run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        timed = rows[self.sizes.warm_steps:] or rows
        s_step = _median([r["t_step"] for r in timed])
        total = sum(r["t_step"] for r in timed)
        phases = {k: round(sum(r.get(k, 0.0) for r in timed) / total, 3) for k in
                  ("t_data", "t_fwd", "t_loss", "t_bwd", "t_opt")}
        run_json = json.loads((Path(spec.run_dir) / "run.json").read_text())
        out = {"config": f"configs/nuscenes/{mode}_{preset}.yaml", "model": cfg.model, "image_hw": run_json["image_hw"],
               "amp": cfg.amp, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "steps": len(rows),
               "timed_steps": len(timed), "s_per_step": round(s_step, 4),
               "samples_per_s": round(cfg.batch_size / s_step, 3), "first_step_s": round(rows[0]["t_step"], 3),
               "data_wait_fraction": phases["t_data"], "phase_fractions": phases,
               "peak_gib": self.peak_gib(), "wall_s": round(wall, 1), "losses": [r["loss"] for r in rows],
               "backend": run_json.get("backend"), "run_dir": str(spec.run_dir)}
        if flop is not None:
            out.update({"gflop_per_step": round(flop / 1e9, 1),
                        "fraction_of_matmul_rate": self.rate_fraction(flop / s_step)})
        self.runs[name] = out
        return out

    def base_run(self, name: str) -> dict[str, Any]:
        """A training run other steps compare with: the timed step's result, run now if needed."""
        if name not in self.runs:
            mode, preset = name.split("_")
            self.train_run(name, mode, preset, self.sizes.warm_steps + self.sizes.steps)
        return self.runs[name]

    def step_pretrain_small(self) -> dict[str, Any]:
        return self.base_run("pretrain_small")

    def step_finetune_small(self) -> dict[str, Any]:
        return self.base_run("finetune_small")

    def step_pretrain_base(self) -> dict[str, Any]:
        return self.base_run("pretrain_base")

    def step_finetune_base(self) -> dict[str, Any]:
        return self.base_run("finetune_base")

    def _compare(self, ref: list[float], other: list[float], rtol: float) -> dict[str, Any]:
        n = min(len(ref), len(other))
        rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref[:n], other[:n])]
        worst = max(rel) if rel else float("inf")
        return {"steps_compared": n, "max_rel_diff": worst, "rtol": rtol, "agree": bool(n and worst <= rtol)}

    def step_amp_vs_fp32(self) -> dict[str, Any]:
        amp = self.base_run("pretrain_small")
        fp32 = self.train_run("pretrain_small_fp32", "pretrain", "small", self.sizes.compare_steps, flops=False,
                              amp="off")
        out = {"amp_losses": amp["losses"][: self.sizes.compare_steps], "fp32_losses": fp32["losses"],
               "fp32_s_per_step": fp32["s_per_step"], "amp_s_per_step": amp["s_per_step"],
               **self._compare(amp["losses"], fp32["losses"], AMP_LOSS_RTOL)}
        if not out["agree"]:
            raise RuntimeError(f"AMP and fp32 losses differ by {out['max_rel_diff']:.3g} relative (> {AMP_LOSS_RTOL})")
        return out

    def step_torchrun(self) -> dict[str, Any]:
        plain = self.base_run("pretrain_small")
        cfg = self.train_config("pretrain", "small", self.sizes.compare_steps)
        config_file = self.work / "torchrun_pretrain_small.yaml"
        atomic_write_text(config_file, yaml.safe_dump(dataclass_to_dict(cfg), sort_keys=False))
        run_dir = self.work / "runs" / "pretrain_small_torchrun"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "bevctl.cli", "pretrain", "--dataroot", str(self.world()), "--version", self.version,
               "--labels", str(self.labels()), "--config", str(config_file), "--out", str(run_dir),
               "--device", self.device.type, "--workers", str(cfg.num_workers)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, self.remaining() - 5))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise RuntimeError(f"torchrun exited {proc.returncode}: {' | '.join(tail)}")
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        backend = json.loads((run_dir / "run.json").read_text()).get("backend")
        want = "nccl" if self.cuda else "gloo"
        out = {"command": "torchrun --standalone --nproc_per_node 1 -m bevctl.cli pretrain ...", "backend": backend,
               "wall_s": round(wall, 1), "torchrun_losses": [r["loss"] for r in rows],
               "plain_losses": plain["losses"][: len(rows)],
               **self._compare(plain["losses"], [r["loss"] for r in rows], TORCHRUN_LOSS_RTOL)}
        if backend != want:
            raise RuntimeError(f"the torchrun run used process-group backend {backend!r}, expected {want!r}")
        if not out["agree"]:
            raise RuntimeError(f"torchrun and plain losses differ by {out['max_rel_diff']:.3g} relative "
                               f"(> {TORCHRUN_LOSS_RTOL})")
        return out

    def step_evaluate_visualize(self) -> dict[str, Any]:
        from bevctl.data.nuscenes import load_index
        from bevctl.train.evaluate import evaluate
        from bevctl.train.visualize import visualize

        finetuned = Path(self.base_run("finetune_small")["run_dir"]) / "last.pt"
        pretrained = Path(self.base_run("pretrain_small")["run_dir"]) / "last.pt"
        self.reset_peak()
        t0 = time.perf_counter()
        result = evaluate(finetuned, str(self.world()), self.version, "val", str(self.gt()),
                          out=self.work / "eval_val.json", device=str(self.device),
                          num_workers=self.sizes.eval_workers, progress=False)
        eval_s = time.perf_counter() - t0
        token = load_index(str(self.world()), self.version).samples_in("val")[0].token
        t0 = time.perf_counter()
        pictures = visualize(pretrained, token, self.work / "visualize", labels=str(self.labels()),
                             gt=str(self.gt()), device=str(self.device))
        return {"evaluate_s": round(eval_s, 2), "val_samples": result["num_samples"], "miou": result["miou"],
                "visualize_s": round(time.perf_counter() - t0, 2), "pictures": len(pictures),
                "peak_gib": self.peak_gib()}

    def step_profile(self) -> dict[str, Any]:
        from torch.profiler import ProfilerActivity, profile

        from bevctl.train.loop import train

        cfg = self.train_config("pretrain", "small", self.sizes.profile_steps)
        spec = self.run_spec("pretrain_small_profile", "pretrain", cfg)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:
            train(spec)
        events = prof.key_averages()
        key = "self_cpu_time_total"
        if self.cuda:  # the attribute's name before torch 2.4 was self_cuda_time_total
            key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        table = events.table(sort_by=key, row_limit=30)
        name = f"{self.args.name}-profile.txt"
        atomic_write_text(self.out / name, table + "\n")
        total = sum(getattr(e, key) for e in events) or 1.0
        top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:12]
        return {"steps": self.sizes.profile_steps, "sorted_by": key, "table": name,
                "top": [{"op": e.key, "share": round(getattr(e, key) / total, 4), "calls": e.count} for e in top]}

    def step_compile(self) -> dict[str, Any]:
        eager = self.base_run("pretrain_small")
        t0 = time.perf_counter()
        run = self.train_run("pretrain_small_compiled", "pretrain", "small",
                             self.sizes.warm_steps + self.sizes.steps, flops=False, model_factory=compiled_model)
        return {"backend": self.args.compile_backend, "wall_s": round(time.perf_counter() - t0, 1),
                "first_step_s": run["first_step_s"],
                "compile_s_estimate": round(run["first_step_s"] - eager["s_per_step"], 2),
                "eager_s_per_step": eager["s_per_step"], "compiled_s_per_step": run["s_per_step"],
                "speedup": round(eager["s_per_step"] / run["s_per_step"], 3), "peak_gib": run["peak_gib"],
                "loss_vs_eager": self._compare(eager["losses"], run["losses"], AMP_LOSS_RTOL)}

    # ---- driver ---------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, steps: list[str]) -> int:
        signal.signal(signal.SIGALRM, _on_alarm)
        failed = False
        for i, name in enumerate(steps):
            if self.results["steps"].get(name, {}).get("status", "").startswith("ok"):
                continue  # already built as another step's input
            estimate = STEP_ESTIMATE_S[name] if not self.args.smoke else 1
            if self.remaining() < estimate:  # would not fit: a later, shorter step still may
                self.results["steps"].setdefault(name, {"status": "skipped: wall-clock budget"})
                continue
            print(f"== {name}", flush=True)
            t0 = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, max(0.1, self.remaining()))
            try:
                result = getattr(self, f"step_{name}")()
                entry: dict[str, Any] = {"status": "ok", "result": result}
            except BudgetExceeded:
                entry = {"status": "stopped: wall-clock budget"}
            except Exception as e:  # noqa: BLE001 - record it, go on with the other steps
                traceback.print_exc()
                entry = {"status": "failed", "error": _one_line(e)}
                failed = True
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            entry["seconds"] = round(time.monotonic() - t0, 1)
            self.results["steps"][name] = entry
            print(f"== {name}: {entry['status']} in {entry['seconds']} s", flush=True)
            self.write()
            if entry["status"].startswith("stopped"):
                for rest in steps[i + 1:]:
                    self.results["steps"].setdefault(rest, {"status": "skipped: wall-clock budget"})
                break
        self.results["ray_imported"] = "ray" in sys.modules  # the GPU machine has no Ray: must stay False
        self.write()
        return 1 if failed else 0

    def write(self) -> None:
        self.results["wall_s"] = round(time.monotonic() - self.started, 1)
        atomic_write_text(self.out / f"{self.args.name}.json", json.dumps(self.results, indent=2) + "\n")
        atomic_write_text(self.out / f"{self.args.name}.md", markdown(self.results))


class _GlobalOnlyTracker:
    """Stands in for FlopCounterMode's per-module tracker, so every FLOP counts under "Global":
    the tracker's hooks fail on a module called under no_grad with a parameter among its inputs
    (BEVFormer's history-frame forward: "Expected gradient function to be set")."""

    parents = {"Global"}

    def __enter__(self) -> "_GlobalOnlyTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def flop_counter():
    """torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention) without its
    module breakdown; ``get_total_flops()`` after the ``with`` block."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnlyTracker()
    return counter


def compiled_model(spec) -> torch.nn.Module:
    """RunSpec.model_factory: the run's model under torch.compile (a top-level function: it pickles)."""
    from bevctl.train.build import build_model
    from bevctl.train.model.bevformer import compile_model

    return compile_model(build_model(spec.cfg), backend=spec.extra.get("compile_backend", "inductor"))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(r: dict[str, Any]) -> str:
    steps = r["steps"]
    env = r.get("env", {})
    lines = ["# bevctl GPU check", ""]
    if r["mode"] == "smoke":
        lines += ["**Smoke mode** (tiny sizes, `--smoke`): checks that the script runs; the numbers mean nothing.", ""]
    lines += [f"Device `{r['device']}` {env.get('gpu', '')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
              f"transformers {env.get('transformers')}, {env.get('cpu_cores')} CPU cores. Measured matmul rate "
              f"({env.get('matmul', {}).get('dtype')}, n={env.get('matmul', {}).get('n')}): "
              f"**{env.get('matmul', {}).get('tflop_per_s')} TFLOP/s**. Wall {r.get('wall_s')} s of a "
              f"{r['budget_s']} s budget.", "", "| step | status | s |", "|---|---|---|"]
    for name, e in steps.items():
        status = e["status"] + (f": {e['error']}" if "error" in e else "")
        lines.append(f"| {name} | {status.replace('|', '/')} | {_fmt(e.get('seconds'))} |")

    def res(name: str) -> dict[str, Any] | None:
        e = steps.get(name, {})
        return e.get("result") if e.get("status", "").startswith("ok") else None

    lab = [(n, res(n)) for n in ("labeler_mask2former", "labeler_synth") if res(n)]
    if lab:
        lines += ["", "## Pseudo-labelling (in process, `--workers 0`)", "",
                  "| labeler | device, dtype | model input | images | img/s | model busy | GFLOP/image | % of matmul rate | peak GiB | decode / model / write s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, x in lab:
            hw = "x".join(map(str, x.get("model_input_hw", [])))
            where = f"{x['labeler_device']}, {x['labeler_dtype']}" if x["labeler_dtype"] else "- (stand-in)"
            lines.append(f"| {name} | {where} | {hw} | {x['images_labeled']} | "
                         f"{x['images_per_s']} | {_pct(x['model_busy'])} | {x['gflop_per_image']} | "
                         f"{_pct(x['fraction_of_matmul_rate'])} | {_fmt(x['peak_gib'])} | "
                         f"{x['decode_s']:.1f} / {x['model_s']:.1f} / {x['write_s']:.1f} |")
        lines.append("")
        lines.append("Target: model busy >= 90% at 900x1600 input.")
    runs = [(n, res(n)) for n in ("pretrain_small", "finetune_small", "pretrain_base", "finetune_base") if res(n)]
    if runs:
        lines += ["", "## Training (AMP, recipe configs, random init)", "",
                  "| run | image | s/step | samples/s | data wait | fwd / loss / bwd / opt | GFLOP/step | % of matmul rate | peak GiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, x in runs:
            p = x["phase_fractions"]
            lines.append(f"| {name} | {'x'.join(map(str, x['image_hw']))} | {x['s_per_step']} | {x['samples_per_s']} | "
                         f"{_pct(x['data_wait_fraction'])} | {_pct(p['t_fwd'])} / {_pct(p['t_loss'])} / "
                         f"{_pct(p['t_bwd'])} / {_pct(p['t_opt'])} | {_fmt(x.get('gflop_per_step'))} | "
                         f"{_pct(x.get('fraction_of_matmul_rate'))} | {_fmt(x['peak_gib'])} |")
        lines += ["", "Targets: data wait < 5% of a `small` step; `base` <= 0.8 s per sample (BEVFormer's mmcv "
                  "build: ~2.4 s per sample per A100; an H200 has ~3x its bf16 rate); the loss < 10% of a step."]
    for name, title in (("amp_vs_fp32", "AMP vs fp32"), ("torchrun", "torchrun (one process)"),
                        ("compile", "torch.compile"), ("evaluate_visualize", "evaluate + visualize"),
                        ("prepare_gt", "prepare-gt"), ("synth", "synthetic world"),
                        ("gpu_tests", "pytest -m gpu")):
        x = res(name)
        if x:
            shown = {k: v for k, v in x.items() if not isinstance(v, (list, dict))}
            lines += ["", f"## {title}", "", "; ".join(f"{k} {_fmt(v, 4)}" for k, v in shown.items())]
    prof = res("profile")
    if prof:
        lines += ["", f"## Profile: `pretrain_small`, {prof['steps']} steps (top ops by {prof['sorted_by']})", "",
                  "| op | share | calls |", "|---|---|---|"]
        lines += [f"| `{t['op'][:70]}` | {_pct(t['share'])} | {t['calls']} |" for t in prof["top"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every step runs (seconds)")
    ap.add_argument("--out", default=None, help="where <name>.json/.md go (default bench/results; --smoke: WORK/results)")
    ap.add_argument("--name", default="gpu", help="file stem of the results (default gpu)")
    ap.add_argument("--work", default=None, help="scratch directory (default $TMPDIR/bevctl-gpu-check)")
    ap.add_argument("--budget-s", type=float, default=530.0,
                    help="stop before this many seconds of wall-clock time, keeping partial results (default 530)")
    ap.add_argument("--only", default=None, help=f"comma-separated steps to run ({', '.join(STEPS)})")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --smoke: eager)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here (use --device cpu --smoke for the CPU smoke run)",
              file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.smoke:
        print("error: --device cpu runs only with --smoke (full sizes take hours on a CPU)", file=sys.stderr)
        return 2
    chosen = [s.strip() for s in (args.only or ",".join(STEPS)).split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = sorted((set(chosen) | skip) - set(STEPS))
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    import tempfile

    args.work = args.work or str(Path(tempfile.gettempdir()) / "bevctl-gpu-check")
    args.out = args.out or (str(Path(args.work) / "results") if args.smoke else str(ROOT / "bench" / "results"))
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the hub
    steps = [s for s in STEPS if s in chosen and s not in skip]
    if "env" not in steps:
        steps.insert(0, "env")  # the matmul rate every fraction is measured against
    check = Check(args)
    code = check.run(steps)
    print(f"results: {check.out / (args.name + '.json')} and .md", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
