"""Small Zarr v3 helpers shared by every per-sample store (BEV ground truth, pseudo-labels).

A *sample store* is a Zarr v3 group with:

- ``tokens``: variable-length string array (N,), the sample tokens in store order;
- ``done``: uint8 array (N,), the completion record per sample: ``TODO`` 0, ``DONE`` 1, ``FAILED`` 2;
- any number of data arrays whose first axis is the sample axis, created at their final shape;
- group attributes ``{"bevctl": {"kind", "format", "bevctl_version", "num_samples",
  "tokens_sha256", "metadata", "provenance"}}``; ``metadata`` is whatever the concrete store
  says makes two stores interchangeable (grid, class set, dataset version, labeler, ...) and is
  validated on reopen; ``provenance`` (dataroot, host, ...) is recorded only.

Exactly-once protocol (no locks; zarr-python 3 has no synchronizer):

1. The **driver** creates the store with every array at its final shape, the token list, the
   metadata and ``done`` all ``TODO`` (:meth:`SampleStore.create`). Locally, creation happens
   in a temp directory that is renamed into place, so a store either exists whole or not at all.
   On object storage (a URL, see :mod:`bevctl.storage.location`; there is no rename) the group
   is first written with a ``bevctl_creating`` marker and no ``bevctl`` attributes, then every
   array, and the ``bevctl`` attributes last, in one PUT of the group's ``zarr.json`` that also
   drops the marker: :meth:`SampleStore.open` refuses a store without them, and the driver's
   rerun rebuilds a store still marked as being created (it never held results).
2. **Workers** write only whole chunks that belong to their own samples; no
   two workers ever touch the same chunk, and nobody appends, resizes or writes attributes. A
   worker never writes ``done``: it *reports* success (or failure) to the driver.
3. The **driver** alone writes ``done``, and marks a sample ``DONE`` only after its worker
   reported success, i.e. after every chunk of that sample has been written.
4. A rerun (:meth:`SampleStore.open_or_create` without ``overwrite``) validates the store
   against the expected metadata and tokens, then redoes every sample not marked ``DONE``
   (:meth:`SampleStore.todo_indices`): ``TODO`` and ``FAILED`` alike. Their chunks are simply
   rewritten whole, so a chunk torn by a crash (or left behind by a killed worker) is replaced.

Hence a crash or Ctrl-C at any moment loses at most the work in flight and never counts a
sample twice or counts one that is incomplete. (zarr's LocalStore additionally writes each
chunk file via temp file + rename, so local chunks are never torn in the first place; an
object store writes each chunk with one PUT, which is never seen half-written either.)

Chunking rule for data arrays: put whole samples in chunks (``chunks[0]`` samples per chunk)
and assign work in units of whole chunks; with ``chunks[0] == 1`` any partition of samples
is safe. Compression default: Blosc zstd level 5 with bitshuffle and a crc32c checksum
(:func:`~bevctl.storage.codecs.default_compressors`); fill values and checksums follow
:mod:`bevctl.storage.codecs`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bevctl import __version__
from bevctl.errors import BevctlError
from bevctl.io import is_disk_full
from bevctl.storage import location
from bevctl.storage.codecs import default_compressors, string_compressors

STORE_FORMAT = 1
ATTRS_KEY = "bevctl"
CREATING_KEY = "bevctl_creating"  # set while a store on object storage is being created

TODO, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {TODO: "todo", DONE: "done", FAILED: "failed"}


@dataclass(frozen=True)
class ArraySpec:
    """One data array of a sample store; axis 0 is the sample axis."""

    name: str
    shape: tuple[int, ...]  # final shape, shape[0] == number of samples
    dtype: str  # numpy dtype string, e.g. "uint8"
    chunks: tuple[int, ...]  # chunks[0] samples per chunk (1 = any sample partition is safe)
    fill_value: Any = 0
    dimension_names: tuple[str, ...] | None = None
    # zarr bytes->bytes codecs; None = default_compressors() (every array is compressed and checksummed)
    compressors: tuple[Any, ...] | None = None
    # values known when the store is made (per-sample poses, scene names): written by the driver
    # at creation, before the store exists for readers; None = fill_value until workers write
    data: Any = field(default=None, compare=False, repr=False)


def _jsonable(value: Any) -> Any:
    """Normalise metadata the way it comes back from zarr.json (tuples -> lists, ...)."""
    return json.loads(json.dumps(value, sort_keys=True))


def tokens_digest(tokens: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_difference(recorded: Any, expected: Any, where: str) -> tuple[str, Any, Any] | None:
    """The first (key path, recorded, expected) where two JSON values differ, or None."""
    if isinstance(recorded, dict) and isinstance(expected, dict):
        for key in sorted(set(recorded) | set(expected)):
            sub = f"{where}.{key}" if where else key
            if key not in recorded:
                return sub, "<missing>", expected[key]
            if key not in expected:
                return sub, recorded[key], "<missing>"
            diff = _first_difference(recorded[key], expected[key], sub)
            if diff:
                return diff
        return None
    return None if recorded == expected else (where, recorded, expected)


class IncompleteStore(BevctlError):
    """A store on object storage whose creation was interrupted (marker, no ``bevctl`` attrs)."""


def is_incomplete(path: str | Path) -> bool:
    """True for a store whose creation was interrupted: its group ``zarr.json`` carries the
    ``bevctl_creating`` marker and no ``bevctl`` attributes."""
    try:
        meta = json.loads(location.read_bytes(location.join(path, "zarr.json")))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    return isinstance(attrs, dict) and CREATING_KEY in attrs and ATTRS_KEY not in attrs


def _fill(group: zarr.Group, tokens: list[str], arrays: Sequence[ArraySpec]) -> None:
    """Create ``tokens``, ``done`` and the data arrays of a new store in ``group``."""
    n = len(tokens)
    chunk_n = max(1, min(n, 1 << 16))
    tok = group.create_array("tokens", shape=(n,), dtype=str, chunks=(chunk_n,), compressors=string_compressors())
    if n:
        tok[:] = np.array(tokens, dtype=object)
    group.create_array(
        "done", shape=(n,), dtype="uint8", chunks=(chunk_n,), fill_value=TODO,
        compressors=default_compressors(),
    )
    for spec in arrays:
        group.create_array(
            spec.name,
            shape=spec.shape,
            dtype=spec.dtype,
            chunks=spec.chunks,
            fill_value=spec.fill_value,
            compressors=spec.compressors or default_compressors(),
            dimension_names=spec.dimension_names,
        )
        if spec.data is not None and spec.shape[0]:
            group[spec.name][...] = spec.data


def _create_local(path: Path, tokens: list[str], arrays: Sequence[ArraySpec], attrs: dict[str, Any],
                  overwrite: bool) -> None:
    """Build the store in a temp directory beside ``path``, then rename it into place."""
    if path.exists() and not overwrite:
        raise BevctlError(f"{path} already exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        group = zarr.open_group(location.zarr_store(tmp), mode="w", zarr_format=3)
        _fill(group, tokens, arrays)
        group.attrs[ATTRS_KEY] = attrs
        if path.exists():  # overwrite: remove the old store only once the new one is ready
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _create_remote(url: str, kind: str, tokens: list[str], arrays: Sequence[ArraySpec], attrs: dict[str, Any],
                   overwrite: bool) -> None:
    """Object storage has no rename: write the group with the ``bevctl_creating`` marker, then
    the arrays, then the ``bevctl`` attributes (which drop the marker) in one last PUT."""
    with location.storage_errors(url):
        if location.exists(url):
            if not overwrite:
                raise BevctlError(f"{url} already exists (use --overwrite to replace it)")
            if not location.is_file(location.join(url, "zarr.json")):
                raise BevctlError(f"{url} exists and is not a Zarr store; refusing to delete it (remove it yourself)")
            location.remove(location.join(url, "zarr.json"))  # the old store stops being one at once
            location.remove_tree(url)
        group = zarr.open_group(location.zarr_store(url), mode="w", zarr_format=3,
                                attributes={CREATING_KEY: {"kind": kind}})
        _fill(group, tokens, arrays)
        group.attrs.put({ATTRS_KEY: attrs})


class SampleStore:
    """A validated per-sample Zarr v3 store (see the module docstring for the protocol)."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = str(path)  # a local path or a URL, as given
        self.group = group
        info = group.attrs.get(ATTRS_KEY)
        if not isinstance(info, dict):
            if CREATING_KEY in group.attrs:
                raise IncompleteStore(f"{path}: incomplete store (its creation was interrupted); "
                                      "rerun the command that makes it, or use --overwrite")
            raise BevctlError(f"{path}: not a bevctl store (no '{ATTRS_KEY}' attributes)")
        self.info: dict[str, Any] = info
        self.kind: str = info.get("kind", "?")
        self.metadata: dict[str, Any] = info.get("metadata", {})
        try:
            self.tokens: list[str] = [str(t) for t in group["tokens"][:]] if "tokens" in group else []
        except Exception as e:  # noqa: BLE001 - a torn tokens chunk or zarr.json raises many kinds
            raise BevctlError(f"{path}: the 'tokens' array does not read ({type(e).__name__}); run bevctl verify "
                              f"{path}") from None
        self._index = {t: i for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise BevctlError(f"{path}: duplicate sample tokens in the store")

    # ---- creation / opening ---------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        kind: str,
        metadata: Mapping[str, Any],
        tokens: Sequence[str],
        arrays: Sequence[ArraySpec],
        overwrite: bool = False,
        provenance: Mapping[str, Any] | None = None,
    ) -> "SampleStore":
        """Create a store with every array at final shape, ``done`` all TODO (driver only).

        ``path`` is a local path or a URL. Locally built in a temp directory beside ``path`` and
        renamed into place; on object storage written in place with the ``bevctl`` attributes
        last (module docstring). Refuses an existing ``path`` unless ``overwrite`` (then the old
        store is removed). ``provenance`` (e.g. the dataroot) is recorded but never validated:
        moving a dataset keeps its stores.
        """
        target = str(path)
        location.check(target)
        tokens = [str(t) for t in tokens]
        if len(set(tokens)) != len(tokens):
            raise BevctlError(f"{target}: duplicate sample tokens given")
        n = len(tokens)
        for spec in arrays:
            if spec.name in ("tokens", "done"):
                raise BevctlError(f"{target}: array name '{spec.name}' is reserved")
            if not spec.shape or spec.shape[0] != n:
                raise BevctlError(f"{target}: array '{spec.name}' must have {n} samples on axis 0, got {spec.shape}")
        attrs = {
            "kind": kind,
            "format": STORE_FORMAT,
            "bevctl_version": __version__,
            "num_samples": n,
            "tokens_sha256": tokens_digest(tokens),
            "metadata": _jsonable(dict(metadata)),
            "provenance": _jsonable(dict(provenance or {})),
        }
        local = location.local_path(target)
        if local is None:
            _create_remote(target, kind, tokens, arrays, attrs, overwrite)
        else:
            _create_local(local, tokens, arrays, attrs, overwrite)
        return cls(target, zarr.open_group(location.zarr_store(target), mode="r+", zarr_format=3))

    @classmethod
    def open(
        cls,
        path: str | Path,
        kind: str,
        expected: Mapping[str, Any] | None = None,
        mode: str = "r",
        remedy: str | None = None,
    ) -> "SampleStore":
        """Open an existing store of ``kind``; every key of ``expected`` must equal the recorded
        metadata (one BevctlError line naming the first difference otherwise, and ``remedy``:
        what to do about it)."""
        path = str(path)
        location.check(path)
        if not location.is_file(location.join(path, "zarr.json")):
            raise BevctlError(f"{path}: no Zarr store there")
        try:
            with location.storage_errors(path):
                group = zarr.open_group(location.zarr_store(path, read_only=mode == "r"), mode=mode,  # type: ignore[arg-type]
                                        zarr_format=3)
        except BevctlError:
            raise
        except Exception as e:  # noqa: BLE001 - zarr raises many kinds on bad stores
            raise BevctlError(f"{path}: cannot open as a Zarr v3 group ({type(e).__name__}: {e})") from None
        store = cls(path, group)
        if store.kind != kind:
            raise BevctlError(f"{path}: is a '{store.kind}' store, expected a '{kind}' store")
        if store.info.get("format") != STORE_FORMAT:
            raise BevctlError(f"{path}: store format {store.info.get('format')} is not supported (need {STORE_FORMAT})")
        if "done" not in group or "tokens" not in group:
            raise BevctlError(f"{path}: incomplete store (missing 'tokens' or 'done')")
        if expected:
            store.check_metadata(expected, remedy=remedy)
        return store

    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        kind: str,
        metadata: Mapping[str, Any],
        tokens: Sequence[str],
        arrays: Sequence[ArraySpec],
        overwrite: bool = False,
        provenance: Mapping[str, Any] | None = None,
    ) -> tuple["SampleStore", bool]:
        """The driver's entry point: ``(store, created)``. An existing store must match the
        metadata, tokens and array shapes exactly, else one BevctlError line (unless
        ``overwrite``, which rebuilds it from scratch)."""
        path = str(path)
        location.check(path)
        if overwrite or not location.exists(path) or is_incomplete(path):
            # a store whose creation was interrupted never held results: build it again
            store = cls.create(path, kind, metadata, tokens, arrays, overwrite=overwrite or location.exists(path),
                               provenance=provenance)
            return store, True
        if not location.is_file(location.join(path, "zarr.json")):
            raise BevctlError(f"{path} exists and is not a Zarr store (use --overwrite to replace it)")
        store = cls.open(path, kind, mode="r+")
        store.check_metadata(metadata, exact=True)
        store.check_tokens(tokens)
        store.check_arrays(arrays)
        return store, False

    # ---- validation -----------------------------------------------------------------------

    def _mismatch(self, what: str, remedy: str | None = None) -> BevctlError:
        return BevctlError(f"{self.path}: {what}; {remedy or 'use --overwrite to rebuild it, or another output path'}")

    def check_metadata(self, expected: Mapping[str, Any], exact: bool = False, remedy: str | None = None) -> None:
        recorded = self.metadata
        wanted = _jsonable(dict(expected))
        if not exact:
            recorded = {k: recorded.get(k, "<missing>") for k in wanted}
        diff = _first_difference(recorded, wanted, "")
        if diff:
            key, rec, exp = diff
            raise self._mismatch(f"store was made for {key}={_short(rec)}, expected {_short(exp)}", remedy)

    def check_tokens(self, tokens: Sequence[str]) -> None:
        tokens = [str(t) for t in tokens]
        if tokens == self.tokens:
            return
        if len(tokens) != len(self.tokens):
            raise self._mismatch(f"store holds {len(self.tokens)} samples, expected {len(tokens)}")
        i = next(i for i, (a, b) in enumerate(zip(self.tokens, tokens)) if a != b)
        raise self._mismatch(f"sample {i} is '{self.tokens[i]}' in the store, expected '{tokens[i]}'")

    def check_arrays(self, arrays: Sequence[ArraySpec]) -> None:
        for spec in arrays:
            if spec.name not in self.group:
                raise self._mismatch(f"array '{spec.name}' is missing")
            arr = self.array(spec.name)
            same_dtype = np.dtype(arr.dtype) == np.dtype(spec.dtype) or (  # zarr reads "str" back as StringDType
                np.dtype(arr.dtype).kind in "TU" and np.dtype(spec.dtype).kind in "TU")
            if tuple(arr.shape) != tuple(spec.shape) or not same_dtype:
                raise self._mismatch(
                    f"array '{spec.name}' is {arr.dtype}{tuple(arr.shape)}, expected {spec.dtype}{tuple(spec.shape)}"
                )

    # ---- access ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def index_of(self, token: str) -> int:
        try:
            return self._index[token]
        except KeyError:
            raise BevctlError(f"{self.path}: no sample '{token}' in this store") from None

    def array(self, name: str) -> zarr.Array:
        node = self.group[name]
        assert isinstance(node, zarr.Array)
        return node

    def status(self) -> np.ndarray:
        """uint8 (N,) completion record: TODO 0, DONE 1, FAILED 2 (read fresh each call)."""
        try:
            return np.asarray(self.array("done")[:], dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - a torn done chunk or zarr.json raises many kinds
            raise BevctlError(f"{self.path}: the 'done' record does not read ({type(e).__name__}); run bevctl "
                              f"verify {self.path}") from None

    def is_done(self, token: str) -> bool:
        return bool(self.array("done")[self.index_of(token)] == DONE)

    def todo_indices(self) -> np.ndarray:
        """Indices of every sample not marked DONE (TODO and FAILED): what a rerun redoes."""
        return np.flatnonzero(self.status() != DONE)

    def counts(self) -> dict[str, int]:
        status = self.status()
        return {name: int((status == code).sum()) for code, name in STATUS_NAMES.items()}

    def consolidate(self) -> None:
        """Write consolidated metadata (every array's ``zarr.json`` copied into the group's) so
        that readers (xarray, dask) open the store with one GET. Driver only, at the end of a
        job; array metadata never changes after creation, so it cannot go stale."""
        with warnings.catch_warnings():  # "not part of the Zarr format 3 specification" (zarr-python reads it)
            warnings.simplefilter("ignore")
            with location.storage_errors(self.path):
                zarr.consolidate_metadata(location.zarr_store(self.path), zarr_format=3)

    def mark(self, indices: Sequence[int] | np.ndarray, status: int) -> None:
        """Record ``status`` for ``indices``. Driver only, and DONE only after the worker
        reported that every chunk of those samples is written."""
        if status not in STATUS_NAMES:
            raise ValueError(f"bad status {status}")
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            return
        done = self.array("done")
        current = np.asarray(done[:], dtype=np.uint8)
        current[idx] = status
        done[:] = current


class CompletionLog:
    """The driver's buffer of completion records: ``done(i)`` / ``failed(i)`` collect sample
    indices reported by workers; ``flush()`` writes them (driver only) and ``tick()`` flushes at
    most every ``every_s`` seconds, so a crash loses at most that much bookkeeping (the work is
    redone on the rerun, never double-counted)."""

    def __init__(self, store: Any, every_s: float = 1.0) -> None:  # anything with ``mark(indices, status)``
        self._clock = time.monotonic
        self.store = store
        self.every_s = every_s
        self._done: list[int] = []
        self._failed: list[int] = []
        self._last = self._clock()

    def done(self, index: int) -> None:
        self._done.append(index)

    def failed(self, index: int) -> None:
        self._failed.append(index)

    def flush(self) -> None:
        if self._failed:
            self.store.mark(self._failed, FAILED)
            self._failed.clear()
        if self._done:
            self.store.mark(self._done, DONE)
            self._done.clear()
        self._last = self._clock()

    def tick(self) -> None:
        if self._clock() - self._last > self.every_s:
            self.flush()

    def flush_on_exit(self) -> None:
        """:meth:`flush` in a ``finally`` block: on a full disk the records are dropped instead
        of raising over the error that ended the job (those samples are redone by the rerun)."""
        try:
            self.flush()
        except OSError as e:
            if not is_disk_full(e):
                raise
            self._done.clear()
            self._failed.clear()
