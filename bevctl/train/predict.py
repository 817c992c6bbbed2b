"""``bevctl predict``: a trained model over chosen samples into a prediction store.

Samples are chosen by split, by scene or by token (or ``SCENE:INDEX``), and always run in scene
order, each scene in time order, with the model's temporal history exactly as in evaluation
(:mod:`bevctl.train.inference`): a temporal model's frame gets the previous frame's BEV only
when that frame is the previous keyframe of its scene and was chosen too; otherwise (a scene's
first frame, a scene boundary, a gap in a chosen subset) it runs without history, and the store
records that (``history`` = 0).

Resumable and exactly-once (:mod:`bevctl.storage.base`): a rerun writes only the samples not
marked done. A temporal model's history is recomputed for them: each run of consecutive frames
(a *chain*) that holds a sample to do is run from its first frame, and only the samples not done
are written, so a resumed store equals an uninterrupted one. Writes go to a background thread
while the model runs on; a sample is marked done only after its chunks are written.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bevctl.config import dataclass_to_dict
from bevctl.data.nuscenes import load_index
from bevctl.data.records import DatasetIndex, SampleRecord
from bevctl.errors import BevctlError
from bevctl.io import remove_stale_temp_files
from bevctl.storage import location
from bevctl.storage.base import CompletionLog, SampleStore
from bevctl.storage.predictions import KIND, prediction_arrays, quantize_probabilities
from bevctl.train.build import load_trained_model
from bevctl.train.dataset import TrainDataset
from bevctl.train.distributed import resolve_device
from bevctl.train.inference import forward_in_order, history_flags, make_loader, uses_history

log = logging.getLogger(__name__)


@dataclass
class PredictSummary:
    out: str
    total: int
    already_done: int
    done_now: int = 0
    forwards: int = 0  # frames run (more than done_now when a resumed chain rebuilds its history)
    seconds: float = 0.0
    first_batch_seconds: float = 0.0  # until the first batch was through the model (loader start-up)
    first_batch_samples: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.forwards / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_samples_per_s(self) -> float:
        """Rate after the first batch (excludes the DataLoader's start-up)."""
        span, n = self.seconds - self.first_batch_seconds, self.forwards - self.first_batch_samples
        return n / span if span > 0 and n > 0 else self.samples_per_s


def choose_samples(index: DatasetIndex, split: str | None = None, scenes: Sequence[str] | None = None,
                   samples: Sequence[str] | None = None) -> list[SampleRecord]:
    """The chosen samples in scene order (scenes in dataset order, keyframes in time order).
    At most one of ``split``, ``scenes``, ``samples`` (tokens or ``SCENE:INDEX``); none = all."""
    if sum(x is not None for x in (split, scenes, samples)) > 1:
        raise BevctlError("predict: give at most one of --split, --scenes, --samples")
    if split is not None:
        chosen = index.samples_in(split)
    elif scenes is not None:
        chosen = [s for name in scenes for s in index.scene_samples(name)]
    elif samples is not None:
        picked = {index.find_sample(ref).token for ref in samples}
        chosen = [s for s in index.all_samples() if s.token in picked]
    else:
        chosen = index.all_samples()
    order = {name: k for k, name in enumerate(index.scenes)}
    chosen = sorted(dict((s.token, s) for s in chosen).values(), key=lambda s: (order[s.scene_name], s.index_in_scene))
    if not chosen:
        raise BevctlError(f"{index.dataroot}/{index.version}: no samples chosen")
    return chosen


def work_indices(todo: Sequence[int], history: Sequence[bool]) -> list[int]:
    """The store indices to run so that every ``todo`` sample gets the history it would get in
    an uninterrupted run: with history, each chain holding a todo sample from its first frame up
    to its last todo sample; without, just ``todo``."""
    todo_set = set(int(i) for i in todo)
    if not any(history):
        return sorted(todo_set)
    work: list[int] = []
    start = 0
    for i in range(len(history) + 1):
        if i == len(history) or not history[i]:  # a chain is [start, i)
            chain_todo = [k for k in range(start, i) if k in todo_set]
            if chain_todo:
                work.extend(range(start, max(chain_todo) + 1))
            start = i
    return work


def contiguous_runs(indices: Sequence[int]) -> list[list[int]]:
    """``indices`` split into runs of consecutive integers, in order: ``[3, 4, 6] -> [[3, 4], [6]]``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    h.update(location.read_bytes(path))
    return h.hexdigest()


@torch.no_grad()
def predict(
    checkpoint: str | Path,
    dataroot: str,
    version: str,
    out: str | Path,
    split: str | None = None,
    scenes: Sequence[str] | None = None,
    samples: Sequence[str] | None = None,
    probabilities: bool = False,
    device: str = "auto",
    batch_size: int = 4,
    num_workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    limit: int | None = None,
) -> PredictSummary:
    """Predict every chosen sample not yet done into ``out`` (a local path or a URL).
    ``limit`` (tests, benchmarks) stops after writing that many samples, as an interruption would."""
    out = str(out)
    location.check(out)
    if batch_size < 1:
        raise BevctlError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    trained = load_trained_model(checkpoint, dev)
    model, cfg = trained.model, trained.cfg
    ckpt_file = str(checkpoint) if not location.is_dir(str(checkpoint)) else location.join(str(checkpoint), "last.pt")
    temporal = uses_history(cfg, trained.run)
    grid, class_set = trained.setup.grid, trained.setup.class_set
    index = load_index(dataroot, version)
    chosen = choose_samples(index, split, scenes, samples)
    history = history_flags(chosen, temporal)
    metadata = {
        "grid": dataclass_to_dict(grid), "class_set": dataclass_to_dict(class_set),
        "classes": list(class_set.names_with_background),
        "checkpoint": {"sha256": file_sha256(ckpt_file), "model": cfg.model, "mode": trained.run.get("mode")},
        "dataset": {"version": version}, "probabilities": probabilities, "temporal": temporal,
    }  # fmt: skip
    arrays = prediction_arrays(chosen, grid, class_set.num_classes, probabilities, history)
    store, created = SampleStore.open_or_create(out, KIND, metadata, [s.token for s in chosen], arrays,
                                                overwrite=overwrite,
                                                provenance={"dataroot": str(dataroot), "checkpoint": str(checkpoint)})
    todo = [int(i) for i in store.todo_indices()]
    summary = PredictSummary(out=out, total=len(chosen), already_done=len(chosen) - len(todo))
    if not todo:
        return summary
    if not created and location.is_local(out):
        remove_stale_temp_files(out, recursive=True)  # chunk writes a killed run left half done
    work = work_indices(todo, history)
    todo_set = set(todo)
    ds = TrainDataset([chosen[i] for i in work], index.samples, trained.setup.image_hw)
    loader = make_loader(ds, batch_size, num_workers, temporal)
    pred_arr = store.array("pred")
    prob_arr = store.array("probabilities") if probabilities else None
    completions = CompletionLog(store, every_s=1.0)

    def write(first: int, ids: np.ndarray, probs: np.ndarray | None) -> list[int]:
        """Samples ``first .. first + len(ids) - 1``: one chunk each, in one Zarr call (zarr
        writes the chunks of one call concurrently: less overhead than a call per chunk)."""
        last = first + ids.shape[0]
        pred_arr[first:last] = ids
        if prob_arr is not None:
            prob_arr[first:last] = probs
        return list(range(first, last))

    bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn(), disable=not progress)
    pending: list[Future] = []
    writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="predict-write")

    def harvest(block: bool) -> None:
        keep = []
        for fut in pending:
            if block or fut.done():
                for i in fut.result():  # raises the write's error (disk full, storage)
                    completions.done(i)
                    summary.done_now += 1
            else:
                keep.append(fut)
        pending[:] = keep
        completions.tick()

    start = time.perf_counter()
    submitted = 0
    try:
        with bar:
            task = bar.add_task("predict", total=len(work), rate="")
            k = 0
            for fwd in forward_in_order(model, loader, ds.samples, dev, temporal):
                ids = fwd.logits.argmax(1).to(torch.uint8).cpu().numpy()  # (B, X, Y)
                probs = quantize_probabilities(fwd.logits.softmax(1)).cpu().numpy() if probabilities else None
                rows = [b for b in range(ids.shape[0]) if work[k + b] in todo_set]  # batch rows to write
                if limit is not None:
                    rows = rows[:max(0, limit - submitted)]
                for run in contiguous_runs([work[k + b] for b in rows]):  # store indices, consecutive
                    sel = rows[:len(run)]
                    rows = rows[len(run):]
                    pending.append(writer.submit(write, run[0], ids[sel], None if probs is None else probs[sel]))
                    submitted += len(run)
                k += ids.shape[0]
                summary.forwards += ids.shape[0]
                if not summary.first_batch_samples:
                    summary.first_batch_seconds = time.perf_counter() - start
                    summary.first_batch_samples = ids.shape[0]
                harvest(block=False)
                elapsed = time.perf_counter() - start
                bar.update(task, advance=ids.shape[0], rate=f"{summary.forwards / max(elapsed, 1e-9):.1f} samples/s")
                if limit is not None and submitted >= limit:
                    break
            harvest(block=True)
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        # only samples whose chunks were written are marked done
        for fut in pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                for i in fut.result():
                    completions.done(i)
        completions.flush_on_exit()
        summary.seconds = time.perf_counter() - start
    return summary


def format_summary(s: PredictSummary) -> str:
    rate = f" in {s.seconds:.1f} s ({s.samples_per_s:.1f} samples/s)" if s.done_now else ""
    return (f"predict: {s.out}: {s.total} samples, {s.already_done} already done, {s.done_now} predicted now{rate}"
            + (f"; {s.forwards - s.done_now} done frames rerun for their history" if s.forwards > s.done_now else ""))
