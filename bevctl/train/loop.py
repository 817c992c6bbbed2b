"""The training loop shared by ``bevctl pretrain`` and ``bevctl finetune``.

One optimiser step = ``grad_accum`` micro-batches of ``batch_size`` samples on each of
``world`` processes (the *global batch*). The data order is a seeded permutation per epoch,
cut into global batches; rank ``r`` takes its slice of each, so 2 processes x batch b compute
the same update as 1 process x batch 2b (losses are per-sample means, DDP averages gradients).
The schedule (warm-up + cosine) is fixed at the start by ``epochs`` and ``max_steps`` (whichever
ends first; when ``epochs`` ends the run before ``max_steps``, one line says so and how to lift
it). ``--resume`` with a higher ``epochs`` or ``max_steps`` continues the run: the steps done keep
their results, the rest of the cosine follows the new length. A resume with nothing left to do
says so and changes nothing.

Run directory::

    RUN/config.yaml     the TrainConfig       RUN/run.json      mode, absolute data paths, world
                                              size, the label map resolved (pretraining)
    RUN/scenes.json     scenes trained on     RUN/metrics.jsonl one JSON line per logged step
    RUN/checkpoints/step_NNNNNNN.pt           RUN/last.pt       the newest checkpoint

``RUN`` is a local directory or a URL (``s3://bucket/runs/pre``, see
:mod:`bevctl.storage.location`): every file is written whole (temp file + rename, or one PUT);
on object storage ``metrics.jsonl`` is uploaded whole at every checkpoint and at the end, and
TensorBoard event files are only written for local run directories.

Checkpoints hold model, optimiser, scheduler, scaler, step, RNG states, config, bevctl version.
``resume=True`` continues from ``RUN/last.pt`` exactly: the sampler skips the consumed
batches, so on CPU an interrupted + resumed run ends bit-identical to an uninterrupted one.
A non-finite loss (or gradient norm, without fp16 scaling) stops the run with
:class:`TrainingDiverged`; nothing is saved after it, so ``RUN/last.pt`` stays the last good one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset, Sampler

import bevctl
from bevctl.config import dataclass_from_dict, dataclass_to_dict
from bevctl.errors import BevctlError
from bevctl.io import remove_stale_temp_files
from bevctl.storage import location
from bevctl.train import distributed as D
from bevctl.train.build import build_model, resolve
from bevctl.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from bevctl.train.config import TrainConfig, config_diff
from bevctl.train.dataset import build_train_dataset, collate
from bevctl.train.tasks import make_task, to_device

# config fields that may change on --resume: they do not change the results of the steps already
# done (epochs and max_steps only move the end of the run; the rest of the LR schedule follows)
RESUME_MUTABLE = ("num_workers", "prefetch_factor", "checkpoint_every", "keep_checkpoints", "log_every",
                  "epochs", "max_steps")

log = logging.getLogger(__name__)


class TrainingDiverged(BevctlError):
    """A non-finite loss or gradient: the run stopped, the last good checkpoint is kept."""


@dataclass
class RunSpec:
    """Everything a training process needs (picklable: it travels to spawned DDP workers)."""

    mode: str  # "pretrain" | "finetune"
    cfg: TrainConfig
    run_dir: str | Path  # a local directory or a URL
    dataroot: str | None = None
    version: str | None = None
    labels: str | None = None  # labels.zarr (pretrain)
    gt: str | None = None  # BEV GT cache (finetune)
    init: str | None = None  # checkpoint to initialise the model from (finetune after pretrain)
    resume: bool = False
    device: str = "auto"
    gpus: int = 1
    progress: bool = True
    # hooks for tests and benchmarks (top-level callables so they pickle)
    dataset_factory: Callable[["RunSpec"], Dataset] | None = None
    model_factory: Callable[["RunSpec"], nn.Module] | None = None
    stop_after_step: int | None = None  # simulate an interruption after this step (tests)
    profile: bool = False  # synchronise CUDA around phases for exact timings
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def lr_lambda(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up from ~0 to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total_steps - warmup)
        t = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def freeze_image_backbone(model: nn.Module) -> None:
    """No gradients for the image backbone and its BatchNorm in eval mode (``freeze_backbone``)."""
    encoder = getattr(model, "image_encoder", None)
    if encoder is None:
        raise BevctlError(f"freeze_backbone: model {type(model).__name__} has no image backbone")
    for p in encoder.backbone.parameters():
        p.requires_grad_(False)
    encoder.norm_eval = True  # ImageEncoder.train() keeps its BatchNorm layers in eval mode


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


class StepBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices for one rank, from ``start_step`` to ``total_steps``.

    Epoch ``e`` is the permutation of ``torch.randperm(n, generator=seed + e)``, cut into
    global batches of ``batch * world * accum`` (a ragged tail is dropped). Micro-batch ``m``
    of rank ``r`` in a step is ``global[(m * world + r) * batch : ... + batch]``.
    """

    def __init__(self, n: int, batch: int, world: int, rank: int, accum: int, seed: int,
                 start_step: int, total_steps: int) -> None:
        self.n, self.batch, self.world, self.rank, self.accum = n, batch, world, rank, accum
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.global_batch = batch * world * accum
        self.steps_per_epoch = n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        perm, perm_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
            base = k * self.global_batch
            for m in range(self.accum):
                off = base + (m * self.world + self.rank) * self.batch
                yield perm[off : off + self.batch]  # type: ignore[index]


def steps_for(n_samples: int, cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps) for a dataset of ``n_samples``."""
    global_batch = cfg.batch_size * world * cfg.grad_accum
    spe = n_samples // global_batch
    if spe == 0:
        raise BevctlError(f"training set has {n_samples} samples, fewer than one global batch "
                          f"({cfg.batch_size} x {world} processes x {cfg.grad_accum} accumulation)")
    total = spe * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return spe, total


def _truncate_metrics(path: str, step: int) -> list[str]:
    """Drop metric lines logged after ``step`` (they are recomputed after a resume); returns
    the lines kept."""
    if not location.is_file(path):
        return []
    keep = []
    for line in location.read_text(path).splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line + "\n")
        except json.JSONDecodeError:
            continue  # a torn last line
    location.write_text_atomic(path, "".join(keep))
    return keep


class MetricsLog:
    """``RUN/metrics.jsonl``: locally appended and flushed line by line; on object storage kept
    in memory and uploaded whole (one PUT) by :meth:`sync` (at every checkpoint and at the
    end). Lines after the last checkpoint are recomputed by a resume either way."""

    def __init__(self, path: str, lines: list[str]) -> None:
        self.path = path
        local = location.local_path(path)
        self._file = local.open("a") if local is not None else None
        self._lines = list(lines)
        self._dirty = False

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            self._dirty = True

    def sync(self) -> None:
        if self._file is None and self._dirty:
            location.write_text_atomic(self.path, "".join(self._lines))
            self._dirty = False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:
            self.sync()


def _amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler)."""
    if device.type != "cuda" or cfg.amp == "off":
        return None, False
    if cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def loader_worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` for a quiet Ctrl-C. Ctrl-C reaches the whole process group,
    but only the main process handles it (it stops the workers), so a worker ignores SIGINT; and
    when the interrupted main process leaves while a worker hands it a batch (file descriptors
    via multiprocessing's resource sharer), the worker's sharer thread fails with EOFError or an
    OSError (connection reset, broken pipe): harmless, and not printed as a traceback after the
    resume hint. The sharer thread reports through ``sys.excepthook`` (it catches everything
    itself), other threads through ``threading.excepthook``: both are filtered."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def sharer_noise(exc_type: type[BaseException], thread: threading.Thread | None) -> bool:
        return (thread is not None and thread.name.endswith("(_serve)")
                and issubclass(exc_type, (EOFError, OSError)))

    default_thread_hook = threading.excepthook
    default_sys_hook = sys.excepthook

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if not sharer_noise(args.exc_type, args.thread):
            default_thread_hook(args)

    def sys_hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if not sharer_noise(exc_type, threading.current_thread()):
            default_sys_hook(exc_type, exc, tb)

    threading.excepthook = thread_hook
    sys.excepthook = sys_hook


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(spec: RunSpec) -> str:
    """Run a training job (spawning ``spec.gpus`` processes if asked). Returns ``RUN/last.pt``."""
    run_dir = str(spec.run_dir)
    location.check(run_dir)
    if not spec.resume and location.exists(location.join(run_dir, "last.pt")):
        raise BevctlError(f"{run_dir} already holds a run (last.pt); pass --resume to continue it or pick a new --out")
    try:
        D.launch(_worker, spec.gpus, spec)
    except Exception as e:  # a spawned worker's BevctlError arrives wrapped
        if type(e).__name__ == "ProcessRaisedException":
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else str(e)
            if "BevctlError: " in last or "TrainingDiverged: " in last:
                raise BevctlError(last.split(": ", 1)[1]) from None
        raise
    return location.join(run_dir, "last.pt")


def _worker(spec: RunSpec) -> None:
    info = D.setup(spec.device)
    try:
        _fit(spec, info)
    finally:
        D.teardown()


def _fit(spec: RunSpec, info: D.DistInfo) -> None:
    cfg = spec.cfg
    run_dir = str(spec.run_dir)
    last_pt = location.join(run_dir, "last.pt")
    setup = resolve(cfg)
    device = info.device
    if device.type == "cpu" and os.environ.get("OMP_NUM_THREADS") is None and info.distributed:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world))

    # ---- resume or start ------------------------------------------------------------------
    ckpt = None
    if spec.resume and location.exists(last_pt):
        ckpt = load_checkpoint(last_pt)
        saved = dataclass_from_dict(TrainConfig, ckpt["config"], where=f"{run_dir}/last.pt config")
        diff = config_diff(saved, cfg, ignore=RESUME_MUTABLE)
        if diff:
            raise BevctlError(f"--resume: options differ from the run in {run_dir}: "
                              + ", ".join(f"{k}={getattr(saved, k)!r} (now {getattr(cfg, k)!r})" for k in diff))
        if ckpt["run"]["world"] != info.world:
            raise BevctlError(f"--resume: {run_dir} was trained with {ckpt['run']['world']} processes, now {info.world}")
        if ckpt["run"]["mode"] != spec.mode:
            raise BevctlError(f"--resume: {run_dir} is a {ckpt['run']['mode']} run, not {spec.mode}")

    torch.manual_seed(cfg.seed)
    if spec.dataset_factory is not None:
        dataset = spec.dataset_factory(spec)
    else:
        dataset = build_train_dataset(spec, write_scenes=info.is_main)
    spe, total_steps = steps_for(len(dataset), cfg, info.world)

    torch.manual_seed(cfg.seed)
    model = spec.model_factory(spec) if spec.model_factory is not None else build_model(setup)
    if spec.init and ckpt is None:
        init = load_checkpoint(spec.init)
        try:
            model.load_state_dict(init["model"])
        except RuntimeError as e:
            raise BevctlError(f"--init {spec.init}: weights do not fit this model "
                              f"({str(e).splitlines()[0][:160]})") from None
    if cfg.freeze_backbone:
        freeze_image_backbone(model)
    model.to(device)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_steps, cfg.min_lr_ratio))
    amp_dtype, use_scaler = _amp_settings(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["step"])
        saved_spe = ckpt["run"].get("steps_per_epoch", spe)
        if int(saved_spe) != spe:
            raise BevctlError(f"--resume: an epoch is now {spe} steps, it was {saved_spe}; "
                              f"the dataset or its fraction differs from the original run")
    if start >= total_steps:  # resumed at (or past) the end: say so, change nothing
        _say(spec, info, f"{spec.mode}: nothing left to do: {last_pt} is at step {start} and this run ends at "
                         f"step {total_steps} ({_limits(cfg, spe)}); pass a higher --epochs or --max-steps "
                         f"with --resume to train further")
        return
    note = _limit_note(cfg, spe, total_steps)
    if note:
        _say(spec, info, f"{spec.mode}: {note}")
    absolute = {k: location.absolute(v) if v else v
                for k, v in (("dataroot", spec.dataroot), ("labels", spec.labels), ("gt", spec.gt), ("init", spec.init))}
    label_map = getattr(dataset, "label_map", None)  # provenance of the pseudo-labels' mapping
    run_info = {"mode": spec.mode, **absolute, "version": spec.version, "world": info.world,
                "total_steps": total_steps, "steps_per_epoch": spe, "num_samples": len(dataset),
                "num_classes": setup.num_classes, "image_hw": list(setup.image_hw), "label_map": label_map}
    if info.is_main and label_map is not None:
        log.info("label map '%s' (%s): %d labeler classes -> %s", label_map["name"], label_map["source"],
                 len(label_map["table"]), ", ".join(sorted(set(label_map["table"].values()))))
    if info.is_main:
        location.makedirs(run_dir)
        if location.is_local(run_dir):  # temp files of a checkpoint a killed run was writing
            for d in (run_dir, location.join(run_dir, "checkpoints")):
                remove_stale_temp_files(d)
        location.write_text_atomic(location.join(run_dir, "config.yaml"),
                                   yaml.safe_dump(dataclass_to_dict(cfg), sort_keys=False))
        location.write_text_atomic(location.join(run_dir, "run.json"), json.dumps(run_info, indent=2) + "\n")
        metrics_kept = _truncate_metrics(location.join(run_dir, "metrics.jsonl"), start)
    D.barrier(info)

    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    task = make_task(spec.mode, cfg, setup.grid, setup.num_classes, profile=spec.profile)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, info.world, info.rank, cfg.grad_accum,
                               cfg.seed, start, total_steps)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda",
                        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
                        persistent_workers=False, worker_init_fn=loader_worker_init)

    def checkpoint(step: int) -> None:
        if info.is_main:
            payload = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else {}, "step": step, "rng": rng_state(),
                "config": dataclass_to_dict(cfg), "run": run_info, "bevctl_version": bevctl.__version__,
            }
            save_checkpoint(run_dir, step, payload, keep=cfg.keep_checkpoints)
            if metrics_file is not None:
                metrics_file.sync()
        D.barrier(info)

    last_ckpt_step = start if ckpt is not None else None
    metrics_file = MetricsLog(location.join(run_dir, "metrics.jsonl"), metrics_kept) if info.is_main else None
    tb = _tensorboard(run_dir) if info.is_main and location.is_local(run_dir) else None
    progress = _progress(spec.progress and info.is_main, spec.mode, total_steps, start)
    it = iter(loader)  # draws the workers' base seed from the RNG, in both fresh and resumed runs
    if ckpt is not None:
        set_rng_state(ckpt["rng"])  # after that draw: the RNG continues exactly where it stopped
    t_run = time.perf_counter()
    try:
        with progress:
            task_id = progress.add_task(spec.mode, total=total_steps, completed=start, loss=float("nan"))
            for step in range(start, total_steps):
                net.train()
                t_step = time.perf_counter()
                times = {"t_data": 0.0, "t_fwd": 0.0, "t_loss": 0.0, "t_bwd": 0.0}
                sums: dict[str, float] = {}
                loss_sum = 0.0
                opt.zero_grad(set_to_none=True)
                for m in range(cfg.grad_accum):
                    t0 = time.perf_counter()
                    batch = to_device(next(it), device)
                    times["t_data"] += time.perf_counter() - t0
                    sync = net.no_sync() if info.distributed and m < cfg.grad_accum - 1 else contextlib.nullcontext()
                    with sync:
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            loss, stats = task(net, batch, device)
                        finite = bool(torch.isfinite(loss.detach()).item())
                        if not D.all_true(finite, info):
                            raise TrainingDiverged(_diverged_msg("loss", float(loss.detach()), step + 1, stats,
                                                                 run_dir, last_ckpt_step))
                        t0 = time.perf_counter()
                        scaler.scale(loss / cfg.grad_accum).backward()
                        if spec.profile and device.type == "cuda":
                            torch.cuda.synchronize(device)
                        times["t_bwd"] += time.perf_counter() - t0
                    loss_sum += float(loss.detach())
                    times["t_fwd"] += stats.pop("t_fwd", 0.0)
                    times["t_loss"] += stats.pop("t_loss", 0.0)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                t0 = time.perf_counter()
                scaler.unscale_(opt)
                params = [p for p in model.parameters() if p.grad is not None]
                if cfg.grad_clip > 0:
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                else:
                    gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
                if not math.isfinite(gnorm) and not use_scaler:
                    raise TrainingDiverged(_diverged_msg("gradient norm", gnorm, step + 1, {}, run_dir, last_ckpt_step))
                lr = opt.param_groups[0]["lr"]
                scaler.step(opt)
                scaler.update()
                sched.step()
                if spec.profile and device.type == "cuda":
                    torch.cuda.synchronize(device)
                times["t_opt"] = time.perf_counter() - t0
                times["t_step"] = time.perf_counter() - t_step
                done = step + 1
                loss_avg = loss_sum / cfg.grad_accum
                progress.update(task_id, completed=done, loss=loss_avg)
                if info.is_main and (done % cfg.log_every == 0 or done == total_steps):
                    row = {"step": done, "epoch": step // spe, "loss": loss_avg, "lr": lr, "grad_norm": gnorm,
                           **{k: v / cfg.grad_accum for k, v in sums.items()}, **times,
                           "samples_per_s": cfg.batch_size * cfg.grad_accum * info.world / max(times["t_step"], 1e-9)}
                    if device.type == "cuda":
                        row["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    metrics_file.write(row)  # type: ignore[union-attr]
                    if tb is not None:
                        for k, v in row.items():
                            if k != "step" and isinstance(v, (int, float)):
                                tb.add_scalar(f"{spec.mode}/{k}", v, done)
                if done % cfg.checkpoint_every == 0 or done == total_steps:
                    checkpoint(done)
                    last_ckpt_step = done
                if spec.stop_after_step is not None and done >= spec.stop_after_step:
                    break
    except RuntimeError as e:  # torch raises it wherever the main thread is when a worker dies
        if str(e).startswith("DataLoader worker"):
            raise _loader_died(e, run_dir, last_ckpt_step) from None
        raise
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if tb is not None:
            tb.close()
        del it
    _say(spec, info, f"{spec.mode}: {total_steps - start} steps in {time.perf_counter() - t_run:.1f}s -> {last_pt}")


def _limits(cfg: TrainConfig, spe: int) -> str:
    limits = f"epochs {cfg.epochs} x {spe} steps"
    return limits + (f", max_steps {cfg.max_steps}" if cfg.max_steps else "")


def _limit_note(cfg: TrainConfig, spe: int, total_steps: int) -> str | None:
    """One line when ``epochs`` ends the run before the ``max_steps`` asked for, saying how to lift it."""
    if not cfg.max_steps or total_steps >= cfg.max_steps:
        return None
    need = math.ceil(cfg.max_steps / spe)
    return (f"{total_steps} steps, not {cfg.max_steps}: epochs {cfg.epochs} x {spe} steps per epoch ends the run "
            f"first; pass --epochs {need} to run {cfg.max_steps} steps")


def _say(spec: RunSpec, info: D.DistInfo, line: str) -> None:
    """One line for the user on stderr (main process; not when progress output is off)."""
    if info.is_main and spec.progress:
        Console(stderr=True).print(line, highlight=False, soft_wrap=True)


def _loader_died(e: RuntimeError, run_dir: str, last_ckpt_step: int | None) -> BevctlError:
    """A DataLoader worker process that died (killed, out of memory) as one error line saying
    how to resume, instead of torch's RuntimeError with a traceback."""
    keep = (f"rerun with --resume to continue from {location.join(run_dir, 'last.pt')} (step {last_ckpt_step})"
            if last_ckpt_step is not None else "no checkpoint was written yet: rerun the same command")
    return BevctlError(f"a data loader worker process died ({str(e).strip().splitlines()[0]}); {keep}")


def _diverged_msg(what: str, value: float, step: int, stats: dict[str, float], run_dir: str,
                  last_ckpt_step: int | None) -> str:
    parts = ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if k in ("reproj", "temporal", "ce", "dice"))
    keep = (f"the last good checkpoint is {location.join(run_dir, 'last.pt')} (step {last_ckpt_step})"
            if last_ckpt_step is not None else "no checkpoint was written yet")
    return (f"training diverged: non-finite {what} ({value}) at step {step}"
            + (f" [{parts}]" if parts else "") + f"; stopped, {keep}. Lower the lr or check the inputs")


def _progress(enabled: bool, name: str, total: int, start: int):
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), disable=not enabled)


def _tensorboard(run_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - needs the optional tensorboard package
    except Exception:
        return None
    return SummaryWriter(location.join(run_dir, "tb"))
