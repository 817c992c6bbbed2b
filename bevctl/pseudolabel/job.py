"""The pseudo-label job: every camera image of a dataset through a labeler, into a Zarr store.

Driver (this process)
    builds the work list from the dataset index, starts ``N`` labeler actors on Ray (one GPU
    each with ``gpus``, fractional CPUs with ``workers``), asks one of them for the labeler's
    identity (model id, weights hash, id2label), creates or validates the store
    (:class:`~bevctl.storage.labels.LabelStore`), then streams batches to the actors with at
    most ``inflight`` batches outstanding per actor (back-pressure: memory stays flat). It
    alone records completion: a sample is marked DONE once the actors have reported all six of
    its images written, FAILED if one of them could not be read (``on_error="skip"``).
Actors (:class:`LabelWorker`)
    are threaded (``max_concurrency = inflight``): each call decodes and preprocesses its batch
    in its own thread, then takes the model lock for ``predict``, then writes each sample as
    one whole ``(1, 6, H, W)`` chunk (batches hold whole samples). So the next batches decode while the model runs and the
    model never waits on JPEG decoding. Nothing but small reports travels back to the driver.
Faults
    An actor that dies (``RayActorError``: its process crashed or its node was lost) is
    restarted by Ray (``max_restarts=-1``) and every batch it had in flight is resubmitted to the
    actors that are up; the dead one gets no work until a probe (``info()``) answers, so the job
    also finishes when Ray cannot restart it (a lost node whose GPUs no other node has free).
    Which of its batches killed it is unknown, so each is resubmitted *alone* to an idle actor:
    a death with one batch in flight is charged to that batch, and a batch charged
    ``MAX_ATTEMPTS`` times stops the job with its images named. A killed
    driver takes its actors with it (and the local Ray cluster it started, even on SIGKILL:
    :mod:`bevctl.pseudolabel.reaper`); a rerun resumes from the DONE record and rewrites
    everything else whole.
Multi-node
    Actors are placed with Ray's ``SPREAD`` strategy, so ``--address`` of a cluster puts them on
    as many nodes as fit; the summary counts the images each Ray node labeled. The dataroot and
    the output store must be on storage that every node sees at the same path.
Authentication
    A local cluster uses Ray's token authentication with a token file only this user can read;
    ``--address`` uses the cluster's own settings (:mod:`bevctl.pseudolabel.ray_auth`).

``workers=0`` runs the same worker in this process without Ray (no Ray installed, debugging,
fast tests): ``inflight`` threads call it, so JPEG decoding overlaps the model there too, and its
labeler goes on the GPU when there is one (``device="auto"``; bfloat16, or float16 where bf16 is
missing). With the model on a GPU the batches in flight (and threads) rise to the usable cores:
one GPU eats JPEGs faster than three threads decode them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from bevctl.config import parse_hw
from bevctl.data.images import ImageError, read_image
from bevctl.data.nuscenes import load_index, parse_splits
from bevctl.data.records import DatasetIndex
from bevctl.errors import BevctlError
from bevctl.io import disk_full_error, is_disk_full, remove_stale_temp_files
from bevctl.pseudolabel import ray_auth
from bevctl.pseudolabel.labeler import load_labeler
from bevctl.storage.base import CompletionLog
from bevctl.pseudolabel.reaper import start_reaper, stop_reaper
from bevctl.storage.codecs import MAX_CLASS_ID
from bevctl.storage.labels import LabelStore, LabelStoreSpec, dir_bytes, open_mask_arrays
from bevctl.storage.location import is_local as location_is_local
from bevctl.storage.location import join

log = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/mask2former-swin-large-mapillary-vistas-semantic"
MAX_ATTEMPTS = 3  # actor deaths one batch may cause before the job gives up
MARK_EVERY_S = 1.0  # how often the driver flushes completion records
PROBE_EVERY_S = 1.0  # how often the driver asks a dead actor whether Ray has restarted it

Item = tuple[int, int, str]  # (sample index in the store, camera index, image path)


@dataclass
class PseudolabelConfig:
    dataroot: str
    version: str
    out: str
    model: str = DEFAULT_MODEL
    gpus: int = 0  # > 0: one actor per GPU
    workers: int = 1  # CPU actors when gpus == 0; 0 = no Ray, run in this process
    address: str | None = None  # join an existing Ray cluster
    batch_size: int = 6
    splits: tuple[str, ...] | None = None  # None: every split of the dataset
    resolution: tuple[int, int] | None = None  # (H, W); None: the images' own size
    confidence: bool = False
    on_error: str = "fail"  # "fail" | "skip"
    overwrite: bool = False
    inflight: int = 3  # batches outstanding per actor
    device: str = "auto"
    threads: int | None = None  # torch threads per CPU actor; None: cores // actors
    progress: bool = True

    def __post_init__(self) -> None:
        if self.on_error not in ("fail", "skip"):
            raise BevctlError(f"--on-error must be 'fail' or 'skip', got '{self.on_error}'")
        if self.batch_size < 1:
            raise BevctlError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.gpus < 0 or self.workers < 0:
            raise BevctlError("--gpus and --workers must be >= 0")
        if self.inflight < 1:
            raise BevctlError(f"inflight must be >= 1, got {self.inflight}")
        if self.resolution is not None and min(self.resolution) < 1:
            raise BevctlError(f"--resolution must be positive, got {self.resolution}")


@dataclass
class JobSummary:
    store: str
    model_id: str
    samples_total: int
    samples_done: int  # DONE in the store at the end (this run and earlier ones)
    samples_failed: int  # FAILED at the end
    samples_skipped: int  # already DONE when this run started
    images_labeled: int  # images written by this run
    images_failed: int
    seconds: float  # labeling phase of this run
    images_per_s: float
    bytes_on_disk: int
    compression_ratio: float  # raw mask bytes / mask bytes on disk
    actor_restarts: int = 0
    images_per_node: dict[str, int] = field(default_factory=dict)  # Ray node id -> images labeled there
    model_s: float = 0.0  # summed over actors: time inside labeler.predict
    decode_s: float = 0.0  # summed: read + preprocess (overlaps the model in other threads)
    write_s: float = 0.0  # summed: Zarr chunk writes
    model_busy: float = 0.0  # model_s / (actors x seconds): 1.0 = the model never waited
    labeler_device: str = ""  # the device of the first actor's model ("cuda", "cpu", ...)
    labeler_dtype: str = ""  # its weights' dtype ("bfloat16", "float16", "float32"; "" for stand-ins)
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_resolution(text: str) -> tuple[int, int]:
    """``"450x800"`` -> ``(450, 800)``."""
    return parse_hw(text, "--resolution")


# --------------------------------------------------------------------------------------------
# Worker (a Ray actor, or in-process with workers=0)
# --------------------------------------------------------------------------------------------


class LabelWorker:
    """Loads the labeler once; labels batches of images and writes their masks as whole chunks."""

    def __init__(self, model: str, device: str = "auto", threads: int | None = None) -> None:
        if threads:  # the labeler sizes its thread pool from OMP_NUM_THREADS when it loads
            os.environ["OMP_NUM_THREADS"] = str(threads)
        self.model = model
        self.device = device
        self._labeler: Any = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._arrays: dict[tuple[str, bool], tuple[Any, Any]] = {}
        self.node = _ray_node_id()

    def _get_labeler(self) -> Any:
        with self._load_lock:
            if self._labeler is None:
                self._labeler = load_labeler(self.model, device=self.device)
            return self._labeler

    def info(self) -> dict[str, Any]:
        lab = self._get_labeler()
        return {
            "model_id": str(lab.model_id),
            "weights_hash": str(lab.weights_hash),
            "id2label": {int(k): str(v) for k, v in lab.id2label.items()},
            "pid": os.getpid(),
            "node": self.node,
            "device": str(getattr(lab, "device", "")),  # where its model runs (stand-ins: may be "")
            "dtype": str(getattr(lab, "dtype", "")).removeprefix("torch."),
        }

    def _prepare(self, lab: Any, path: str) -> np.ndarray:
        image = read_image(path)
        hook = getattr(lab, "preprocess_file", None)
        return hook(image, path) if hook is not None else lab.preprocess(image)

    def label(
        self, store_path: str, confidence: bool, out_hw: tuple[int, int], items: Sequence[Item]
    ) -> dict[str, Any]:
        """Decode, predict and write one batch. Returns ``{"ok": [(i, c)], "errors":
        [(i, c, path, reason)], "decode_s", "model_s", "write_s"}``; raises only on faults that
        are not about one image (model errors, store errors)."""
        lab = self._get_labeler()
        key = (store_path, confidence)
        if key not in self._arrays:
            self._arrays[key] = open_mask_arrays(store_path, confidence)
        masks, conf_arr = self._arrays[key]
        t0 = time.perf_counter()
        inputs, good, errors = [], [], []
        for i, c, path in items:
            try:
                inputs.append(self._prepare(lab, path))
                good.append((int(i), int(c)))
            except ImageError as e:
                errors.append((int(i), int(c), path, e.reason))
        t1 = time.perf_counter()
        model_s = 0.0
        if inputs:
            with self._model_lock:  # one predict at a time; the time waiting here is not model time
                t_in = time.perf_counter()
                labels, conf = lab.predict(inputs, tuple(out_hw), confidence)
                model_s = time.perf_counter() - t_in
            _check_output(lab, labels, conf, (len(inputs), *out_hw), confidence)
        t2 = time.perf_counter()
        rows: dict[int, dict[int, int]] = {}  # sample -> camera -> row of `labels`
        for k, (i, c) in enumerate(good):
            rows.setdefault(i, {})[c] = k
        for i, cams in rows.items():
            if len(cams) < masks.shape[1]:
                continue  # a camera could not be read: the sample is FAILED, nothing is written
            order = [cams[c] for c in range(masks.shape[1])]
            try:
                masks[i] = labels[order]  # the whole sample: one chunk (1, 6, H, W)
                if conf_arr is not None:
                    conf_arr[i] = conf[order]
            except OSError as e:
                if is_disk_full(e):
                    raise disk_full_error(f"{store_path} (sample #{i})") from None
                raise
        t3 = time.perf_counter()
        return {"ok": good, "errors": errors, "decode_s": t1 - t0, "model_s": model_s, "write_s": t3 - t2,
                "node": self.node}


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _ray_node_id() -> str:
    """The Ray node this process runs on, or ``"local"`` outside Ray (``workers=0``)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    return "local"


def _check_output(lab: Any, labels: Any, conf: Any, shape: tuple[int, ...], confidence: bool) -> None:
    """The labeler kept its contract: uint8 (B, H, W) labels (and confidence when asked)."""
    for name, arr in (("labels", labels), ("confidence", conf if confidence else labels)):
        if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == shape):
            got = f"{getattr(arr, 'dtype', type(arr).__name__)}{tuple(getattr(arr, 'shape', ()))}"
            raise BevctlError(f"labeler {lab.model_id}: predict returned {name} {got}, expected uint8{shape}")


# --------------------------------------------------------------------------------------------
# Executors: Ray actors or in-process
# --------------------------------------------------------------------------------------------


def _ray_temp_dir() -> str:
    # Ray puts unix sockets under it: keep the path short.
    path = Path(tempfile.gettempdir()) / f"bevray-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _unwrap_ray_error(e: Exception) -> Exception:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


class _RayPool:
    """N threaded labeler actors on Ray; ``submit`` returns an ObjectRef."""

    def __init__(self, cfg: PseudolabelConfig) -> None:
        import ray  # noqa: PLC0415 - ray: heavy; only for the Ray actor pool

        self.ray = ray
        self.model = cfg.model
        self.started_ray = False
        if not ray.is_initialized():
            if cfg.address:
                try:
                    ray.init(address=cfg.address, ignore_reinit_error=True, logging_level=logging.WARNING)
                except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as e:
                    raise ray_auth.join_error(cfg.address, e) from None
            else:
                ray_auth.prepare_local_cluster()  # token authentication, a token file only we can read
                ray.init(  # GPUs: as Ray detects them (asking for more than exist is an error below)
                    num_cpus=_usable_cpus(),
                    include_dashboard=False,
                    _temp_dir=_ray_temp_dir(),
                    ignore_reinit_error=True,
                    logging_level=logging.WARNING,
                    log_to_driver=True,
                )
            self.started_ray = True
        n = cfg.gpus or cfg.workers
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        if cfg.gpus:
            gpus = float(ray.cluster_resources().get("GPU", 0.0))
            if gpus < cfg.gpus:
                self.close()
                raise BevctlError(f"--gpus {cfg.gpus}: the Ray cluster has {gpus:g} GPUs")
            opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": min(1.0, cpus / n)}
            device = "cuda"
            threads = None
        else:
            # Fractional CPUs: N whole-CPU actors on N CPUs starve everything else (STACK.md).
            opts = {"num_cpus": min(1.0, round(0.95 * cpus / n, 3))}
            device = "cpu" if cfg.device == "auto" else cfg.device
            threads = cfg.threads or max(1, int(cpus // n))  # the CPU's cores shared among the actors
        actor_cls = ray.remote(LabelWorker)
        self.actors = [  # SPREAD: over every node of a cluster that has room, not packed onto a few
            actor_cls.options(max_restarts=-1, max_task_retries=0, max_concurrency=cfg.inflight + 1,
                              scheduling_strategy="SPREAD", **opts).remote(cfg.model, device, threads)
            for _ in range(n)
        ]

    def info(self) -> dict[str, Any]:
        """Every actor's labeler identity once loaded (so timing starts with all actors ready);
        they must agree."""
        try:
            infos = self.ray.get([a.info.remote() for a in self.actors])
        except self.ray.exceptions.RayError as e:
            cause = _unwrap_ray_error(e)
            if isinstance(cause, BevctlError):
                raise BevctlError(str(cause)) from None
            raise
        first = infos[0]
        for other in infos[1:]:
            if other["weights_hash"] != first["weights_hash"] or other["id2label"] != first["id2label"]:
                raise BevctlError(
                    f"labeler '{self.model}' loads different weights on different Ray nodes "
                    f"({first['weights_hash'][:12]} vs {other['weights_hash'][:12]})"
                )
        return first

    def submit(self, actor: int, args: tuple) -> Any:
        return self.actors[actor].label.remote(*args)

    def probe(self, actor: int) -> Any:
        """A call that answers once the actor is up again with its labeler loaded."""
        return self.actors[actor].info.remote()

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        return ready

    def close(self) -> None:
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()


class _Done:
    """A finished in-process call, shaped like an ObjectRef for :class:`_InlinePool`."""

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error


class _InlinePool:
    """workers=0: one LabelWorker in this process, without Ray. As in a Ray actor
    (``max_concurrency = inflight``), its ``label`` calls run on ``inflight`` threads, so batches
    decode and write while the model (one call at a time) runs: on a GPU the CPU work would
    otherwise leave it idle most of the time."""

    def __init__(self, cfg: PseudolabelConfig) -> None:
        self.worker = LabelWorker(cfg.model, cfg.device, cfg.threads)
        self.actors = [self.worker]
        self.inflight = cfg.inflight
        self._threads: ThreadPoolExecutor | None = None

    def info(self) -> dict[str, Any]:
        info = self.worker.info()
        if self._threads is None:  # sized once the labeler says where its model runs
            if info["device"].startswith("cuda"):
                self.inflight = max(self.inflight, _usable_cpus())
            self._threads = ThreadPoolExecutor(max_workers=self.inflight, thread_name_prefix="bevctl-label")
        return info

    def submit(self, actor: int, args: tuple) -> Future:
        assert self._threads is not None, "info() first"
        return self._threads.submit(self.worker.label, *args)

    def probe(self, actor: int) -> _Done:
        return _Done(self.worker.info())

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        done = [r for r in refs if isinstance(r, _Done)]
        if done:
            return done[:1]
        # the oldest call first (the driver lists them in submission order), so results are
        # recorded in order, as when calls ran one at a time: a failing batch stops the job
        # before any later one is marked done
        finished, _ = futures_wait(refs[:1], timeout=timeout)
        return list(finished)

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    items: list[Item]
    attempts: int = 0


def _batches(todo: np.ndarray, image_paths: list[list[str]], size: int) -> Iterator[_Batch]:
    """Lazily: the images of the samples in ``todo``, in store order, whole samples at a time
    and at least ``size`` images per batch (a sample's masks are one chunk, written whole by
    the one actor that labels all its cameras)."""
    buf: list[Item] = []
    for i in todo:
        buf.extend((int(i), c, path) for c, path in enumerate(image_paths[int(i)]))
        if len(buf) >= size:
            yield _Batch(buf)
            buf = []
    if buf:
        yield _Batch(buf)


def _make_progress(enabled: bool):  # -> rich Progress or None
    if not enabled:
        return None
    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:6.1f} img/s" if speed else "   ... img/s")

    return Progress(
        TextColumn("[bold]pseudolabel"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
    )  # fmt: skip


def run_pseudolabel(cfg: PseudolabelConfig, index: DatasetIndex | None = None) -> JobSummary:
    """Label every image of the selected splits into ``cfg.out`` (resuming a compatible store).

    ``index`` defaults to ``load_index(cfg.dataroot, cfg.version)``; images are not checked up
    front (a missing one is handled per ``cfg.on_error`` when its turn comes).
    """
    if index is None:
        index = load_index(cfg.dataroot, cfg.version, check_images=False)
    splits = list(cfg.splits) if cfg.splits else index.split_names()
    splits = list(dict.fromkeys(parse_splits(",".join(splits), index)))  # "train,train" once
    samples = [s for split in splits for s in index.samples_in(split)]
    if not samples:
        raise BevctlError(f"{cfg.dataroot}/{cfg.version}: no samples in split(s) {', '.join(splits)}")
    cameras = tuple(cam.channel for cam in samples[0].cameras)
    for s in samples:
        if tuple(cam.channel for cam in s.cameras) != cameras:
            raise BevctlError(f"sample {s.token}: cameras {[c.channel for c in s.cameras]} differ from {list(cameras)}")
    out_hw = cfg.resolution or (samples[0].cameras[0].height, samples[0].cameras[0].width)
    image_paths = [[cam.image_path for cam in s.cameras] for s in samples]
    tokens = tuple(s.token for s in samples)

    if not cfg.overwrite:  # fail fast, before Ray starts and the model loads
        probe = LabelStoreSpec(model_id="", weights_hash="", id2label={}, resolution=out_hw,
                               dataset_version=cfg.version, splits=tuple(splits), tokens=tokens,
                               confidence=cfg.confidence, cameras=cameras).metadata()
        for key in ("model_id", "weights_hash", "id2label"):
            del probe[key]
        LabelStore.precheck(cfg.out, probe, tokens)

    inline = cfg.workers == 0 and not cfg.gpus
    # a local Ray cluster that this process starts goes down with it, even on SIGKILL (reaper.py)
    reaper = start_reaper() if not inline and not cfg.address and not _ray_running() else None
    try:
        pool: _RayPool | _InlinePool = _InlinePool(cfg) if inline else _RayPool(cfg)
    except BaseException:
        stop_reaper(reaper)
        raise
    try:
        info = pool.info()
        spec = LabelStoreSpec(
            model_id=info["model_id"],
            weights_hash=info["weights_hash"],
            id2label=info["id2label"],
            resolution=(int(out_hw[0]), int(out_hw[1])),
            dataset_version=cfg.version,
            splits=tuple(splits),
            tokens=tokens,
            confidence=cfg.confidence,
            cameras=cameras,
        )
        if spec.id2label and max(spec.id2label) > MAX_CLASS_ID:
            raise BevctlError(f"labeler {spec.model_id}: class ids above {MAX_CLASS_ID} do not fit uint8 masks "
                              f"({MAX_CLASS_ID + 1} is the store's fill value, read as ignore)")
        store, created = LabelStore.open_for_writing(cfg.out, spec, str(index.dataroot), overwrite=cfg.overwrite)
        log.info("%s store %s for %d samples", "created" if created else "resuming", cfg.out, len(tokens))
        if not created and location_is_local(cfg.out):
            remove_stale_temp_files(cfg.out, recursive=True)  # chunk writes a killed run left half done
        # a pool may take more batches at once than asked (in process with the model on a GPU)
        cfg = dataclasses.replace(cfg, inflight=getattr(pool, "inflight", cfg.inflight))
        return _drive(cfg, pool, store, image_paths, out_hw, len(cameras), info)
    finally:
        pool.close()
        stop_reaper(reaper)


def _drive(
    cfg: PseudolabelConfig,
    pool: _RayPool | _InlinePool,
    store: LabelStore,
    image_paths: list[list[str]],
    out_hw: tuple[int, int],
    n_cams: int,
    info: dict[str, Any],
) -> JobSummary:
    todo = store.todo_indices()
    n_total = len(store)
    skipped = n_total - int(todo.size)
    n_images = int(todo.size) * n_cams
    store_path = str(store.path)
    source = _batches(todo, image_paths, cfg.batch_size)
    retry: deque[_Batch] = deque()
    pending: dict[Any, tuple[int, int, _Batch]] = {}  # ref -> (actor, its life when submitted, batch)
    per_actor = [0] * len(pool.actors)
    in_flight: list[list[tuple[int, _Batch]]] = [[] for _ in pool.actors]  # per actor: (life, batch)
    alone: list[_Batch | None] = [None] * len(pool.actors)  # a batch of a dead actor, running alone here
    life = [0] * len(pool.actors)  # +1 each time a dead actor answers again
    down = [False] * len(pool.actors)  # actor died and has not answered a probe since
    probes: dict[Any, int] = {}  # outstanding probe of a down actor -> actor
    probe_at = [0.0] * len(pool.actors)  # earliest time of a down actor's next probe
    exhausted = False  # every batch of the work list has been handed out once
    per_node: dict[str, int] = {}
    cams_ok = np.zeros(n_total, dtype=np.int16)
    failed = np.zeros(n_total, dtype=bool)
    completions = CompletionLog(store, every_s=MARK_EVERY_S)
    failures: list[str] = []
    labeled = images_failed = restarts = 0
    times = {"model_s": 0.0, "decode_s": 0.0, "write_s": 0.0}
    flush = completions.flush

    def next_batch() -> _Batch | None:
        nonlocal exhausted
        batch = next(source, None)
        exhausted = batch is None
        return batch

    def submit(a: int, batch: _Batch) -> None:
        ref = pool.submit(a, (store_path, cfg.confidence, out_hw, batch.items))
        pending[ref] = (a, life[a], batch)
        in_flight[a].append((life[a], batch))
        per_actor[a] += 1

    progress = _make_progress(cfg.progress)
    task = progress.add_task("label", total=n_images) if progress else None
    if progress:
        progress.start()
    start = time.perf_counter()
    try:
        while True:
            # Keep every live actor `inflight` batches deep (back-pressure: nothing more is queued).
            # A down actor gets no work, only a probe now and then: Ray may never restart it (its
            # node is gone and no other node has room), and its batches go to the others.
            # Batches of a dead actor (`retry`) go one at a time to an idle actor, which gets
            # nothing else meanwhile; actors take no new work while some wait.
            takers = []  # live actors that may take new batches
            for a in range(len(pool.actors)):
                if down[a]:
                    if a not in probes.values() and time.monotonic() >= probe_at[a]:
                        probes[pool.probe(a)] = a
                    continue
                if alone[a] is not None:
                    continue
                if retry:
                    if per_actor[a] == 0:
                        alone[a] = retry.popleft()
                        submit(a, alone[a])
                    continue
                takers.append(a)
            # Breadth first: each new batch goes to the least loaded taker, so a job with fewer
            # batches than `actors x inflight` still spreads over every actor (every GPU).
            while takers and not exhausted:
                a = min(takers, key=lambda k: per_actor[k])
                if per_actor[a] >= cfg.inflight:
                    break
                batch = next_batch()
                if batch is None:
                    break
                submit(a, batch)
            if not pending and not retry and exhausted:
                break
            for ref in pool.wait([*pending, *probes], timeout=0.5):
                if ref in probes:
                    a = probes.pop(ref)
                    try:
                        _get(pool, ref)
                    except _ActorDied:
                        probe_at[a] = time.monotonic() + PROBE_EVERY_S
                    else:
                        down[a] = False
                        life[a] += 1
                        log.warning("labeler actor %d is back", a)
                    continue
                a, lived, batch = pending.pop(ref)
                per_actor[a] -= 1
                mates = [b for n, b in in_flight[a] if n == life[a]]  # in flight on this life of `a`
                in_flight[a] = [(n, b) for n, b in in_flight[a] if b is not batch]
                if alone[a] is batch:
                    alone[a] = None
                try:
                    result = _get(pool, ref)
                except _ActorDied as e:
                    if lived == life[a] and not down[a]:  # the first news of this death
                        down[a] = True
                        restarts += 1
                        probe_at[a] = time.monotonic()
                        log.warning("labeler actor %d died (%s); Ray restarts it, its batches go to the others", a, e)
                        if all(down):
                            log.warning("every labeler actor is down: waiting for Ray to restart one")
                        if len(mates) == 1:  # it died running this batch alone: charge it
                            batch.attempts += 1
                            if batch.attempts >= MAX_ATTEMPTS:
                                first = batch.items[0][2]
                                raise BevctlError(
                                    f"labeler actor died {batch.attempts} times on the batch starting at {first} ({e})"
                                ) from None
                    retry.append(batch)
                    continue
                for key in times:
                    times[key] += float(result.get(key, 0.0))
                node = str(result.get("node", "local"))
                per_node[node] = per_node.get(node, 0) + len(result["ok"])
                for i, c in result["ok"]:
                    cams_ok[i] += 1
                    if cams_ok[i] == n_cams and not failed[i]:
                        completions.done(i)
                labeled += len(result["ok"])
                for i, c, path, reason in result["errors"]:
                    images_failed += 1
                    if cfg.on_error == "fail":
                        flush()
                        raise BevctlError(f"{path}: {reason} (sample {store.tokens[i]}; --on-error skip records it as failed)")
                    failures.append(f"{path}: {reason}")
                    if not failed[i]:
                        failed[i] = True
                        completions.failed(i)
                if progress:
                    progress.advance(task, len(result["ok"]) + len(result["errors"]))
            completions.tick()
        flush()
    finally:
        # Completion records of finished samples are written even on Ctrl-C / errors.
        try:
            completions.flush_on_exit()
        finally:
            if progress:
                progress.stop()
    seconds = time.perf_counter() - start
    counts = store.counts()
    masks_disk = dir_bytes(join(store_path, "masks"))
    raw = counts["done"] * n_cams * out_hw[0] * out_hw[1]
    summary = JobSummary(
        store=store_path,
        model_id=store.model_id,
        samples_total=n_total,
        samples_done=counts["done"],
        samples_failed=counts["failed"],
        samples_skipped=skipped,
        images_labeled=labeled,
        images_failed=images_failed,
        seconds=round(seconds, 3),
        images_per_s=round(labeled / seconds, 2) if seconds > 0 else 0.0,
        bytes_on_disk=dir_bytes(store_path),
        compression_ratio=round(raw / masks_disk, 1) if masks_disk else 0.0,
        actor_restarts=restarts,
        images_per_node=dict(sorted(per_node.items())),
        model_s=round(times["model_s"], 3),
        decode_s=round(times["decode_s"], 3),
        write_s=round(times["write_s"], 3),
        model_busy=round(times["model_s"] / (len(pool.actors) * seconds), 3) if seconds > 0 else 0.0,
        labeler_device=str(info.get("device", "")),
        labeler_dtype=str(info.get("dtype", "")),
        failures=failures[:100],
    )
    run = store.run_info
    run.update({"updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "last_summary": {
        k: v for k, v in summary.as_dict().items() if k != "failures"}, "failures": failures[:1000]})
    if counts["failed"] == 0 and counts["todo"] == 0:
        run["completed"] = run["updated"]
    store.set_run_info(run)
    store.consolidate()  # consolidated metadata for other Zarr readers (xarray, dask)
    return summary


class _ActorDied(Exception):
    pass


def _get(pool: _RayPool | _InlinePool, ref: Any) -> dict[str, Any]:
    """The result of a call; actor deaths become :class:`_ActorDied`, BevctlErrors stay one line."""
    if isinstance(ref, _Done):
        if ref.error is not None:
            raise ref.error
        return ref.value
    if isinstance(ref, Future):  # _InlinePool: the call's own exception, as raised in it
        return ref.result()
    ray = pool.ray  # type: ignore[union-attr]
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as e:
        raise _ActorDied(type(e).__name__) from None
    except ray.exceptions.RayTaskError as e:
        cause = _unwrap_ray_error(e)
        if isinstance(cause, BevctlError):
            raise BevctlError(str(cause)) from None
        raise


def format_summary(s: JobSummary) -> str:
    lines = [
        f"store        {s.store}",
        f"labeler      {s.model_id}" + (f" ({s.labeler_device}, {s.labeler_dtype})" if s.labeler_dtype else ""),
        f"samples      {s.samples_done}/{s.samples_total} done, {s.samples_failed} failed, "
        f"{s.samples_skipped} skipped (already done)",
        f"images       {s.images_labeled} labeled, {s.images_failed} failed in {s.seconds:.1f} s "
        f"({s.images_per_s:.1f} img/s)",
        f"on disk      {s.bytes_on_disk / 1e6:.2f} MB, masks compressed {s.compression_ratio:.0f}x",
    ]
    if s.images_labeled:
        lines.append(
            f"pipeline     model busy {100 * s.model_busy:.0f}% of the time (predict {s.model_s:.1f} s, "
            f"decode {s.decode_s:.1f} s, write {s.write_s:.1f} s, summed over actors)"
        )
    if len(s.images_per_node) > 1:
        spread = ", ".join(f"{node[:8]} {n}" for node, n in s.images_per_node.items())
        lines.append(f"ray nodes    {len(s.images_per_node)} labeled images ({spread})")
    if s.actor_restarts:
        lines.append(f"restarts     {s.actor_restarts} actor crash(es) recovered")
    for f in s.failures[:10]:
        lines.append(f"failed       {f}")
    if len(s.failures) > 10:
        lines.append(f"failed       ... and {len(s.failures) - 10} more (see the store's bevctl_run.failures)")
    return "\n".join(lines)
