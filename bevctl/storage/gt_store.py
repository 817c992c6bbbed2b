"""BEV ground-truth cache ``gt.zarr`` and the ``bevctl prepare-gt`` driver.

Layout (a :class:`~bevctl.storage.base.SampleStore` of kind ``bev_gt``)::

    gt.zarr/
      tokens   str   (N,)        sample tokens, split by split, scene order
      done     uint8 (N,)        0 todo, 1 done, 2 failed (driver only)
      bev      uint8 (N, X, Y)   one sample per chunk; 0 background, class k -> k + 1
      attrs.bevctl.metadata = {grid, class_set (classes, layers, line width), dataset
                               (version, splits)}   -- validated on reopen
      attrs.bevctl.provenance = {dataroot}          -- recorded only

:func:`prepare_gt` rasterises every sample not yet done in a process pool; workers write
whole ``bev`` chunks and report back, the driver marks ``done`` (see ``storage/base.py``).
The trainer reads with :meth:`GTStore.open` + :meth:`GTStore.get`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bevctl.config import (
    BEVClassSet,
    BEVGrid,
    dataclass_from_dict,
    dataclass_to_dict,
    resolve_class_set,
    resolve_grid,
)
from bevctl.data.bev_gt import bev_gt_for_sample
from bevctl.data.nuscenes import load_index
from bevctl.data.nuscenes_map import check_map_file, map_json_path
from bevctl.data.records import DatasetIndex, SampleRecord
from bevctl.errors import BevctlError
from bevctl.io import disk_full_error, is_disk_full, remove_stale_temp_files
from bevctl.storage.base import DONE, FAILED, TODO, ArraySpec, CompletionLog, SampleStore
from bevctl.storage.labels import read_chunk
from bevctl.storage.location import is_local, join, zarr_store

log = logging.getLogger(__name__)

KIND = "bev_gt"


def grid_metadata(grid: BEVGrid) -> dict[str, Any]:
    return dataclass_to_dict(grid)


def class_set_metadata(class_set: BEVClassSet) -> dict[str, Any]:
    return dataclass_to_dict(class_set)


def bev_spec(n: int, grid: BEVGrid) -> ArraySpec:
    return ArraySpec(
        name="bev", shape=(n, *grid.shape), dtype="uint8", chunks=(1, *grid.shape),
        fill_value=0, dimension_names=("sample", "x", "y"),
    )


class GTStore:
    """Reader of a ``gt.zarr`` cache (picklable: DataLoader workers reopen it lazily)."""

    def __init__(self, store: SampleStore) -> None:
        self._store: SampleStore | None = store
        self.path = store.path
        meta = store.metadata
        try:
            self.grid: BEVGrid = dataclass_from_dict(BEVGrid, meta["grid"], f"{self.path}: grid")
            self.class_set: BEVClassSet = dataclass_from_dict(
                BEVClassSet, meta["class_set"], f"{self.path}: class_set"
            )
        except KeyError as e:
            raise BevctlError(f"{self.path}: GT store metadata lacks {e}") from None
        self.version: str = meta.get("dataset", {}).get("version", "?")
        self.tokens: list[str] = store.tokens
        self._index = {t: i for i, t in enumerate(self.tokens)}
        self._bev: zarr.Array | None = None
        self._status: np.ndarray = store.status()  # read once; refresh() re-reads

    @classmethod
    def open(
        cls,
        path: str | Path,
        expected_grid: BEVGrid | None = None,
        expected_classes: BEVClassSet | None = None,
        expected_version: str | None = None,
        remedy: str | None = None,
    ) -> "GTStore":
        """Open ``gt.zarr`` read-only; refuse it (one BevctlError line, ending with ``remedy``)
        if it was made for another grid, class set or dataset version than the ones given."""
        expected: dict[str, Any] = {}
        if expected_grid is not None:
            expected["grid"] = grid_metadata(expected_grid)
        if expected_classes is not None:
            expected["class_set"] = class_set_metadata(expected_classes)
        store = SampleStore.open(path, KIND, expected=expected or None, mode="r", remedy=remedy)
        if expected_version is not None:
            store.check_metadata({"dataset": {**store.metadata.get("dataset", {}), "version": expected_version}},
                                 remedy=remedy)
        return cls(store)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        state["_bev"] = None
        return state

    def _array(self) -> zarr.Array:
        if self._bev is None:
            if self._store is None:
                self._store = SampleStore.open(self.path, KIND, mode="r")
            self._bev = self._store.array("bev")
        return self._bev

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def refresh(self) -> None:
        """Re-read the completion record (another process may be preparing the store)."""
        if self._store is None:
            self._store = SampleStore.open(self.path, KIND, mode="r")
        self._status = self._store.status()

    def status(self) -> np.ndarray:
        """uint8 (N,) 0 todo, 1 done, 2 failed, as of opening (or the last :meth:`refresh`)."""
        return self._status

    @property
    def done_tokens(self) -> list[str]:
        return [t for t, s in zip(self.tokens, self._status) if s == DONE]

    def is_done(self, token: str) -> bool:
        i = self._index.get(token)
        return i is not None and bool(self._status[i] == DONE)

    def get(self, token: str) -> np.ndarray:
        """The BEV ground truth uint8 (X, Y) of ``token``; refuses a sample not prepared yet."""
        i = self._index.get(token)
        if i is None:
            raise BevctlError(f"{self.path}: no ground truth for sample '{token}' (not in this store)")
        if self._status[i] != DONE:
            raise BevctlError(
                f"{self.path}: sample '{token}' is not prepared yet ({'failed' if self._status[i] == FAILED else 'todo'});"
                " rerun bevctl prepare-gt"
            )
        return read_chunk(self._array(), i, self.path, token)

    def get_many(self, tokens: list[str]) -> np.ndarray:
        """uint8 (B, X, Y) for a batch of tokens."""
        return np.stack([self.get(t) for t in tokens]) if tokens else np.zeros((0, *self.grid.shape), np.uint8)


# ---- the prepare-gt driver --------------------------------------------------------------------


@dataclass
class PrepareSummary:
    out: str
    total: int
    already_done: int
    done_now: int = 0
    failed: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # until the first task reported (pool start-up, map loads)
    first_task_samples: int = 0
    workers: int = 1
    errors: list[str] = field(default_factory=list)
    class_fractions: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.done_now / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_samples_per_s(self) -> float:
        """Rate after the first task reported (excludes start-up and the first map loads)."""
        span = self.seconds - self.startup_seconds
        n = self.done_now + self.failed - self.first_task_samples
        return n / span if span > 0 and n > 0 else self.samples_per_s


# Worker state (one per process): set by _init_worker.
_W: dict[str, Any] = {}


def _init_worker(dataroot: str, grid: BEVGrid, class_set: BEVClassSet, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _W.clear()
    _W.update(dataroot=dataroot, grid=grid, class_set=class_set,
              bev=zarr.open_array(zarr_store(join(out, "bev")), mode="r+", zarr_format=3), out=out)


def _run_task(items: list[tuple[int, SampleRecord]]) -> list[tuple[int, str | None]]:
    """Rasterise and write whole ``bev`` chunks; report (index, error or None) per sample."""
    results: list[tuple[int, str | None]] = []
    for i, sample in items:
        try:
            gt = bev_gt_for_sample(_W["dataroot"], sample, _W["grid"], _W["class_set"])
            _W["bev"][i] = gt  # one whole chunk
            results.append((i, None))
        except BevctlError as e:
            results.append((i, f"sample {sample.token}: {e}"))
        except Exception as e:  # noqa: BLE001 - a bad map record must not kill the whole job
            if is_disk_full(e):  # ... but a full disk is no sample's fault: stop, a rerun resumes
                raise disk_full_error(f"{_W['out']} (sample {sample.token})") from None
            results.append((i, f"sample {sample.token}: {type(e).__name__}: {e}"))
    return results


def _check_maps(dataroot: Path, samples: list[SampleRecord]) -> None:
    """Every map the samples need is there and of the current version (before any store is made)."""
    for location in sorted({s.location for s in samples}):
        try:
            check_map_file(map_json_path(dataroot, location))
        except BevctlError as e:
            raise BevctlError(f"{e} (needed by samples of location {location})") from None


def prepare_gt(
    dataroot: str | Path,
    version: str,
    grid: BEVGrid,
    class_set: BEVClassSet,
    out: str | Path,
    splits: list[str] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    task_size: int = 4,
    progress: bool = True,
    samples: list[SampleRecord] | None = None,
    index: DatasetIndex | None = None,
) -> PrepareSummary:
    """Rasterise the BEV ground truth of every sample of ``splits`` (default: all) into
    ``out`` once; resumable (a rerun does only what is not marked done), Ctrl-C safe.
    ``workers`` 0 or 1 runs in this process. ``samples`` (tests, benchmarks) limits the work to
    those samples; ``index`` skips :func:`~bevctl.data.nuscenes.load_index`."""
    dataroot = Path(dataroot).resolve()
    out = str(out)  # a local path or a URL (bevctl.storage.location)
    if index is None:
        index = load_index(dataroot, version)
    split_names = list(splits) if splits else index.split_names()
    if samples is None:
        samples = []
        seen: set[str] = set()
        for split in split_names:
            for s in index.samples_in(split):
                if s.token not in seen:
                    seen.add(s.token)
                    samples.append(s)
    if not samples:
        raise BevctlError(f"{dataroot}/{version}: no samples in split(s) {', '.join(split_names)}")
    _check_maps(dataroot, samples)
    tokens = [s.token for s in samples]
    metadata = {
        "grid": grid_metadata(grid),
        "class_set": class_set_metadata(class_set),
        "dataset": {"version": version, "splits": split_names},
    }
    store, created = SampleStore.open_or_create(
        out, KIND, metadata, tokens, [bev_spec(len(tokens), grid)],
        overwrite=overwrite, provenance={"dataroot": str(dataroot)},
    )
    todo = [int(i) for i in store.todo_indices()]
    summary = PrepareSummary(out=str(out), total=len(tokens), already_done=len(tokens) - len(todo))
    if not created:
        log.info("prepare-gt: %s exists: %d of %d samples done, %d to do",
                 out, summary.already_done, summary.total, len(todo))
        if is_local(out):
            remove_stale_temp_files(out, recursive=True)  # chunk writes a killed run left half done
    if not todo:
        return summary
    # Group work by location so each worker touches few maps; keep scene order within.
    todo.sort(key=lambda i: (samples[i].location, i))
    tasks = [[(i, samples[i]) for i in todo[k:k + task_size]] for k in range(0, len(todo), task_size)]
    n_workers = min(workers if workers is not None else (os.cpu_count() or 1), len(tasks))
    summary.workers = max(1, n_workers)

    completions = CompletionLog(store, every_s=1.0)

    def record(results: list[tuple[int, str | None]]) -> None:
        if not summary.startup_seconds:
            summary.startup_seconds = time.perf_counter() - start
            summary.first_task_samples = len(results)
        for i, err in results:
            if err is None:
                completions.done(i)
                summary.done_now += 1
            else:
                completions.failed(i)
                summary.failed += 1
                if len(summary.errors) < 10:
                    summary.errors.append(err)
        completions.tick()


    bar = Progress(
        TextColumn("prepare-gt"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(), disable=not progress, transient=False,
    )
    start = time.perf_counter()
    executor: ProcessPoolExecutor | None = None
    try:
        with bar:
            task_id = bar.add_task("gt", total=len(todo), rate="")

            def advance(n: int) -> None:
                elapsed = time.perf_counter() - start
                rate = (summary.done_now + summary.failed) / elapsed if elapsed > 0 else 0.0
                bar.update(task_id, advance=n, rate=f"{rate:.1f} samples/s")

            if n_workers <= 1:
                _init_worker(str(dataroot), grid, class_set, str(out))
                for task in tasks:
                    record(_run_task(task))
                    advance(len(task))
            else:
                # spawn: zarr runs an event-loop thread, which must not be forked.
                executor = ProcessPoolExecutor(
                    max_workers=n_workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker, initargs=(str(dataroot), grid, class_set, str(out)),
                )
                queue = iter(tasks)
                running: dict[Future, int] = {}
                for task in queue:  # keep every worker busy with 2 tasks in flight
                    running[executor.submit(_run_task, task)] = len(task)
                    if len(running) >= 2 * n_workers:
                        break
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        n = running.pop(fut)
                        try:
                            results = fut.result()
                        except BrokenProcessPool:
                            raise BevctlError(
                                f"prepare-gt: a worker process died (out of memory? killed?); the "
                                f"{summary.done_now} samples finished in this run are kept in {out}: rerun to resume"
                            ) from None
                        record(results)
                        advance(n)
                        nxt = next(queue, None)
                        if nxt is not None:
                            running[executor.submit(_run_task, nxt)] = len(nxt)
    finally:
        completions.flush_on_exit()  # record exactly the samples whose workers reported success
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        summary.seconds = time.perf_counter() - start
    if summary.done_now:
        summary.class_fractions = class_fractions(store, class_set, sample_limit=200)
    return summary


def class_fractions(store: SampleStore, class_set: BEVClassSet, sample_limit: int = 200) -> dict[str, float]:
    """Fraction of cells per class over (up to ``sample_limit``, evenly spaced) done samples."""
    done = np.flatnonzero(store.status() == DONE)
    if done.size == 0:
        return {}
    pick = done[np.linspace(0, done.size - 1, min(sample_limit, done.size)).astype(int)]
    bev = store.array("bev")
    counts = np.zeros(class_set.num_classes, dtype=np.int64)
    for i in np.unique(pick):
        counts += np.bincount(np.asarray(bev[int(i)]).ravel(), minlength=class_set.num_classes)[: class_set.num_classes]
    total = max(1, int(counts.sum()))
    return {name: float(c) / total for name, c in zip(class_set.names_with_background, counts)}


def format_summary(s: PrepareSummary) -> str:
    lines = [
        f"prepare-gt: {s.out}: {s.total} samples, {s.already_done} already done, "
        f"{s.done_now} rasterised now, {s.failed} failed"
        + (f" in {s.seconds:.1f} s ({s.samples_per_s:.1f} samples/s on {s.workers} worker(s), "
           f"{s.samples_per_s / max(1, s.workers):.1f} per worker; {s.steady_samples_per_s:.1f} samples/s after "
           f"{s.startup_seconds:.1f} s start-up)" if s.done_now else "")
    ]
    if s.class_fractions:
        lines.append("  cell fractions: " + ", ".join(f"{k} {v:.2%}" for k, v in s.class_fractions.items()))
    for err in s.errors:
        lines.append(f"  failed: {err}")
    if s.failed:
        lines.append("  rerun the same command to retry the failed samples")
    return "\n".join(lines)


__all__ = [
    "GTStore", "KIND", "PrepareSummary", "prepare_gt", "format_summary", "resolve_grid",
    "resolve_class_set", "TODO", "DONE", "FAILED",
]
