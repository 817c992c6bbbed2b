"""The pseudo-label store: per-image semantic masks of every camera of every sample (Zarr v3).

Layout (a :class:`~bevctl.storage.base.SampleStore` of kind ``pseudolabels``)::

    labels.zarr/
      tokens      str   (N,)              sample tokens in store order
      done        uint8 (N,)              TODO 0 / DONE 1 / FAILED 2, written by the driver only
      cameras     str   (6,)              camera order of axis 1
      masks       uint8 (N, 6, H, W)      the labeler's OWN class ids, one chunk per (sample, camera),
                                          run-length + zstd (bevctl.storage.rle)
      confidence  uint8 (N, 6, H, W)      optional: max class probability * 255

The group attributes hold, under ``bevctl.metadata``, everything that makes two stores
interchangeable (labeler id + weights hash, id2label, resolution, cameras, dataset version +
splits, confidence on/off) — a rerun against a store with other values is refused — and,
under ``bevctl_run``, what may change between runs (dataroot, timestamps, last summary,
failure reasons).

Workers write whole ``(sample, camera)`` chunks with :func:`open_mask_arrays`; the driver
alone marks samples done (:meth:`SampleStore.mark`). Readers use :meth:`LabelStore.open`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bevctl.data.records import CAMERAS
from bevctl.errors import BevctlError
from bevctl.storage import location
from bevctl.storage.base import DONE, FAILED, STATUS_NAMES, TODO, ArraySpec, SampleStore, is_incomplete
from bevctl.storage.rle import mask_compressors  # also registers the bevctl_rle codec with zarr

KIND = "pseudolabels"
RUN_KEY = "bevctl_run"

__all__ = [
    "DONE", "FAILED", "TODO", "KIND", "LabelStore", "LabelStoreSpec", "open_mask_arrays",
    "dir_bytes", "label_stats",
]  # fmt: skip


@dataclass(frozen=True)
class LabelStoreSpec:
    """What the driver expects of a store: creates it, or checks an existing one against it."""

    model_id: str
    weights_hash: str
    id2label: Mapping[int, str]
    resolution: tuple[int, int]  # (H, W) of the stored masks
    dataset_version: str
    splits: tuple[str, ...]
    tokens: tuple[str, ...]
    confidence: bool = False
    cameras: tuple[str, ...] = CAMERAS

    def metadata(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "weights_hash": self.weights_hash,
            "id2label": {str(k): v for k, v in sorted(self.id2label.items())},
            "resolution": [int(self.resolution[0]), int(self.resolution[1])],
            "cameras": list(self.cameras),
            "dataset_version": self.dataset_version,
            "splits": list(self.splits),
            "confidence": bool(self.confidence),
        }

    def arrays(self) -> list[ArraySpec]:
        n, c = len(self.tokens), len(self.cameras)
        h, w = self.resolution
        names = ("sample", "camera", "y", "x")
        # masks: run-length + zstd (~0.45x PNG, where Blosc alone is ~1x PNG); confidence: default
        specs = [ArraySpec("masks", (n, c, h, w), "uint8", (1, 1, h, w), dimension_names=names,
                           compressors=mask_compressors())]
        if self.confidence:
            specs.append(ArraySpec("confidence", (n, c, h, w), "uint8", (1, 1, h, w), dimension_names=names))
        return specs


_CHECK_ORDER = (
    "model_id", "weights_hash", "dataset_version", "splits", "resolution", "cameras", "confidence", "id2label",
)  # fmt: skip


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LabelStore:
    """Pseudo-labels of one dataset by one labeler. ``open`` for readers, ``open_for_writing``
    for the driver of the pseudolabel job."""

    def __init__(self, store: SampleStore) -> None:
        self._store = store
        self.path = store.path
        meta = store.metadata
        try:
            self.id2label: dict[int, str] = {int(k): str(v) for k, v in meta["id2label"].items()}
            self.resolution: tuple[int, int] = (int(meta["resolution"][0]), int(meta["resolution"][1]))
            self.cameras: tuple[str, ...] = tuple(meta["cameras"])
            self.model_id: str = str(meta["model_id"])
            self.weights_hash: str = str(meta["weights_hash"])
            self.dataset_version: str = str(meta["dataset_version"])
            self.splits: tuple[str, ...] = tuple(meta["splits"])
            self.has_confidence: bool = bool(meta["confidence"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise BevctlError(f"{self.path}: bad pseudo-label metadata ({type(e).__name__}: {e})") from None
        self._done_cache: np.ndarray | None = None
        try:
            self._masks = store.array("masks")
            self._conf = store.array("confidence") if self.has_confidence else None
        except (KeyError, FileNotFoundError) as e:
            raise BevctlError(f"{self.path}: incomplete store: array {e} is missing; rebuild it with "
                              "bevctl pseudolabel --overwrite") from None
        expected = (len(store.tokens), len(self.cameras), *self.resolution)
        if tuple(self._masks.shape) != expected:
            raise BevctlError(f"{self.path}: masks are {tuple(self._masks.shape)}, metadata says {expected}")

    # ---- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> "LabelStore":
        """Open for reading (the trainer, ``labels stats``, ``labels show``)."""
        return cls(SampleStore.open(path, KIND, mode="r"))

    @classmethod
    def open_for_writing(
        cls, path: str | Path, spec: LabelStoreSpec, dataroot: str, overwrite: bool = False
    ) -> tuple["LabelStore", bool]:
        """Driver only: create the store at final shape, or reopen a compatible one to resume.

        Returns ``(store, created)``. A store made with another labeler, resolution, dataset,
        split list or class list is refused with one line unless ``overwrite``.
        """
        path = str(path)
        meta = spec.metadata()
        if not overwrite and location.is_file(location.join(path, "zarr.json")) and not is_incomplete(path):
            # Name the most telling difference first (a different model also has other classes).
            existing = SampleStore.open(path, KIND, mode="r")
            for key in _CHECK_ORDER:
                existing.check_metadata({key: meta[key]})
        store, created = SampleStore.open_or_create(
            path, KIND, meta, list(spec.tokens), spec.arrays(), overwrite=overwrite,
            provenance={"dataroot": str(dataroot)},
        )
        if created:
            cams = store.group.create_array("cameras", shape=(len(spec.cameras),), dtype=str, chunks=(len(spec.cameras),))
            cams[:] = np.array(spec.cameras, dtype=object)
        elif location.is_local(path):
            _remove_partials(Path(location.local_path(path)))  # type: ignore[arg-type]
        self = cls(store)
        run = dict(self.run_info)
        run.update({"dataroot": str(dataroot), "updated": _now()})
        run.setdefault("created", _now())
        self.set_run_info(run)
        return self, created

    @classmethod
    def precheck(cls, path: str | Path, metadata: Mapping[str, Any], tokens: Sequence[str]) -> None:
        """Before any model is loaded: refuse an existing store whose ``metadata`` keys (a
        subset) or token list differ. Nothing happens when there is no store at ``path``."""
        path = str(path)
        if not location.is_file(location.join(path, "zarr.json")) or is_incomplete(path):
            return
        existing = SampleStore.open(path, KIND, mode="r")
        for key in _CHECK_ORDER:
            if key in metadata:
                existing.check_metadata({key: metadata[key]})
        existing.check_tokens(tokens)

    # ---- reading --------------------------------------------------------------------------

    @property
    def tokens(self) -> list[str]:
        return self._store.tokens

    @property
    def num_classes(self) -> int:
        return max(self.id2label) + 1 if self.id2label else 0

    @property
    def run_info(self) -> dict[str, Any]:
        info = self._store.group.attrs.get(RUN_KEY, {})
        return dict(info) if isinstance(info, dict) else {}

    @property
    def dataroot(self) -> str | None:
        root = self.run_info.get("dataroot") or self._store.info.get("provenance", {}).get("dataroot")
        return str(root) if root else None

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, token: object) -> bool:
        return token in self._store

    def index_of(self, token: str) -> int:
        return self._store.index_of(token)

    def get(self, token: str) -> np.ndarray:
        """uint8 (6, H, W) masks of ``token`` in the labeler's own ids. Raises BevctlError if the
        sample is not done (a FAILED or TODO sample has no trustworthy masks)."""
        return self.get_index(self.index_of(token))

    def get_index(self, i: int) -> np.ndarray:
        self._require_done(i)
        return read_chunk(self._masks, i, self.path, self.tokens[i])

    def get_confidence(self, token: str) -> np.ndarray | None:
        """uint8 (6, H, W) confidence (255 = certain), or None if the store has none."""
        if self._conf is None:
            return None
        i = self.index_of(token)
        self._require_done(i)
        return read_chunk(self._conf, i, self.path, self.tokens[i])

    def _require_done(self, i: int) -> None:
        # A cached snapshot of the done record (readers call this per sample); re-read once on a
        # miss, in case the job is still running.
        if self._done_cache is None or self._done_cache[i] != DONE:
            self._done_cache = self._store.status()
        status = int(self._done_cache[i])
        if status != DONE:
            raise BevctlError(f"{self.path}: sample '{self.tokens[i]}' is {STATUS_NAMES[status]}, not done")

    def status(self, token: str) -> str:
        """``"done"``, ``"failed"`` or ``"todo"``."""
        return STATUS_NAMES[int(self._store.array("done")[self.index_of(token)])]

    def statuses(self) -> np.ndarray:
        """uint8 (N,): TODO 0 / DONE 1 / FAILED 2 (fresh from disk)."""
        return self._store.status()

    def done_tokens(self) -> list[str]:
        st = self.statuses()
        return [t for t, s in zip(self.tokens, st) if s == DONE]

    def counts(self) -> dict[str, int]:
        return self._store.counts()

    # ---- writing (driver) -----------------------------------------------------------------

    def todo_indices(self) -> np.ndarray:
        return self._store.todo_indices()

    def mark(self, indices: Sequence[int] | np.ndarray, status: int) -> None:
        self._store.mark(indices, status)

    def set_run_info(self, info: Mapping[str, Any]) -> None:
        self._store.group.attrs[RUN_KEY] = dict(info)


def read_chunk(array: zarr.Array, i: int, store_path: Any, token: str) -> np.ndarray:
    """``array[i]`` as numpy; a torn or corrupt chunk is one BevctlError line naming the sample."""
    try:
        return np.asarray(array[i])
    except Exception as e:  # noqa: BLE001 - codecs and stores raise many kinds on torn chunks
        name = str(array.name).strip("/") or "array"
        raise BevctlError(f"{store_path}: sample '{token}': unreadable {name} chunk ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120] if str(e) else ''}); rebuild the store") from None


def open_mask_arrays(path: str | Path, confidence: bool) -> tuple[zarr.Array, zarr.Array | None]:
    """Workers: the masks (and confidence) arrays, for whole-chunk writes ``masks[i, c] = m``."""
    def open_one(name: str) -> zarr.Array:
        return zarr.open_array(location.zarr_store(location.join(path, name)), mode="r+", zarr_format=3)

    return open_one("masks"), (open_one("confidence") if confidence else None)


def _remove_partials(path: Path) -> None:
    """Temp files of chunk writes interrupted by a kill (zarr's LocalStore writes ``*.partial``
    then renames); they are never read, but would count as bytes on disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                try:
                    os.unlink(os.path.join(root, name))
                except FileNotFoundError:
                    pass


def dir_bytes(path: str | Path) -> int:
    """Bytes of every file (or object) under ``path`` (a local path or a URL)."""
    return location.du(path)


def _chunk_hist(block: np.ndarray) -> np.ndarray:
    """(1, 1, H, W) uint8 -> (1, 1, 1, 256) pixel counts per class id."""
    counts = np.bincount(np.asarray(block, dtype=np.uint8).ravel(), minlength=256)
    return counts.reshape(1, 1, 1, 256).astype(np.int64)


def label_stats(path: str | Path) -> dict[str, Any]:
    """Class histogram and coverage over the DONE samples (dask, one task per chunk), sample
    counts, bytes on disk and the masks' compression ratio."""
    import dask.array as da  # noqa: PLC0415 - dask: heavy; only for the lazy array view

    store = LabelStore.open(path)
    status = store.statuses()
    done_idx = np.flatnonzero(status == DONE)
    h, w = store.resolution
    n_cams = len(store.cameras)
    masks_path = location.join(store.path, "masks")
    mask_bytes = dir_bytes(masks_path)
    raw = int(done_idx.size * n_cams * h * w)  # all-background chunks are not even stored
    result: dict[str, Any] = {
        "path": str(store.path),
        "model_id": store.model_id,
        "resolution": list(store.resolution),
        "samples": store.counts(),
        "images_done": int(done_idx.size * n_cams),
        "bytes_on_disk": dir_bytes(store.path),
        "mask_bytes_on_disk": mask_bytes,
        "mask_bytes_raw": raw,
        "compression_ratio": float(raw / mask_bytes) if mask_bytes else 0.0,
        "classes": [],
    }
    if done_idx.size == 0:
        return result
    arr = da.from_zarr(store._masks)  # (N, 6, H, W), chunks (1, 1, H, W)
    arr = arr[done_idx]
    per_chunk = arr.map_blocks(_chunk_hist, chunks=(1, 1, 1, 256), dtype=np.int64)
    try:
        hist, present = da.compute(per_chunk.sum(axis=(0, 1, 2)), (per_chunk > 0).sum(axis=(0, 1, 2)))
    except Exception as e:  # noqa: BLE001 - a torn chunk: find and name its sample
        for i in done_idx:
            read_chunk(store._masks, int(i), store.path, store.tokens[int(i)])
        raise BevctlError(f"{store.path}: cannot read the masks ({type(e).__name__}: {e})") from None
    total = float(hist.sum())
    n_images = done_idx.size * n_cams
    for cid in np.flatnonzero(hist):
        result["classes"].append(
            {
                "id": int(cid),
                "name": store.id2label.get(int(cid), f"<unknown id {int(cid)}>"),
                "pixels": int(hist[cid]),
                "pixel_fraction": float(hist[cid] / total),
                "image_coverage": float(present[cid] / n_images),  # fraction of images containing it
            }
        )
    return result
