"""Fill value, codecs and the checked chunk reader shared by every bevctl store of class ids
(pseudo-labels, BEV ground truth, predictions).

Conventions (a store that follows them is "checked"):

- ``IGNORE`` (255) is the ``fill_value`` of every class-id array and never a class: labelers
  may use ids 0..254, BEV classes are 1..254 (0 background). A chunk missing from the store
  reads back as all-``IGNORE`` (Zarr's defined behaviour), so it is never a class, and a
  whole ``IGNORE`` chunk of a finished sample is reported as missing (:func:`read_sample`).
- every compressed chunk carries a checksum: zstd's own frame checksum for class ids
  (:func:`mask_compressors`), Blosc + ``crc32c`` otherwise (:func:`default_compressors`). Both
  ship with zarr (``crc32c`` via its ``google-crc32c`` dependency): any Zarr v3 reader opens
  the store without bevctl. A flipped bit, a truncated or zero-filled chunk fails to decode.
- writers write every chunk, even one equal to the fill value (:data:`WRITE_CONFIG`), so a
  verifier can require that every chunk of a finished sample exists.

Stores written before these conventions (``fill_value`` 0, ``bevctl_rle``, no checksums) still
open: :func:`read_sample` then only reports chunks that fail to decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from bevctl.errors import BevctlError

IGNORE = 255  # fill value of class-id arrays; read as "ignore" by every loss and metric
MAX_CLASS_ID = IGNORE - 1
MASK_ZSTD_LEVEL = 15  # bench/results/store_codecs.md
WRITE_CONFIG: dict[str, Any] = {"write_empty_chunks": True}  # writers: zarr.open_array(...).with_config(WRITE_CONFIG)


def mask_compressors(level: int = MASK_ZSTD_LEVEL) -> tuple[ZstdCodec]:
    """Class-id masks: zstd with its frame checksum (bench/results/store_codecs.md)."""
    return (ZstdCodec(level=level, checksum=True),)


def default_compressors() -> tuple[BloscCodec, Crc32cCodec]:
    """Other arrays (confidence, ``done``): Blosc zstd-5 bitshuffle, then a crc32c checksum."""
    return (BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec())


def string_compressors() -> tuple[ZstdCodec]:
    """Variable-length string arrays (``tokens``, ``cameras``)."""
    return (ZstdCodec(level=3, checksum=True),)


class CorruptChunk(BevctlError):
    """A chunk of a finished sample that is missing or does not decode (checksum, truncation)."""

    def __init__(self, message: str, token: str, camera: str | None) -> None:
        super().__init__(message)
        self.token = token
        self.camera = camera


def is_checked(array: zarr.Array) -> bool:
    """True if ``array`` follows the conventions above (fill ``IGNORE``): a whole-fill chunk
    can then only be a missing one."""
    fill = array.fill_value
    return fill is not None and int(fill) == IGNORE and np.dtype(array.dtype) == np.uint8


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_sample(array: zarr.Array, i: int, store_path: Any, token: str,
                cameras: Sequence[str] | None = None) -> np.ndarray:
    """``array[i]`` as numpy, checked: a chunk that does not decode, or (for an ``IGNORE``-filled
    class-id array) a camera slab that is all ``IGNORE`` (its chunk is missing), raises
    :class:`CorruptChunk` naming the store, sample, camera (when ``cameras`` names axis 1) and
    array. For predict, evaluate, training and ``labels stats``."""
    name = str(array.name).strip("/") or "array"
    if cameras is not None and array.ndim > 1 and array.chunks[1] != 1:
        cameras = None  # one chunk holds every camera of the sample: it is whole or damaged as one
    try:
        data = np.asarray(array[i])
    except Exception as e:  # noqa: BLE001 - codecs and stores raise many kinds on torn chunks
        data = None
        error = e
    slabs = range(data.shape[0] if data is not None else array.shape[1]) if cameras is not None else [None]
    for c in slabs:
        where = f"sample '{token}'" + (f" camera {cameras[c]}" if c is not None else "")  # type: ignore[index]
        if data is None:
            try:
                block = np.asarray(array[i] if c is None else array[i, c])
            except Exception as e:  # noqa: BLE001 - the slab that fails to decode
                raise CorruptChunk(f"{store_path}: {where}: corrupt {name} chunk ({_reason(e)}); "
                                   f"run bevctl verify {store_path} --repair, then rerun the job", token,
                                   None if c is None else cameras[c]) from None  # type: ignore[index]
        else:
            block = data if c is None else data[c]
        if is_checked(array) and block.size and bool((block == IGNORE).all()):
            raise CorruptChunk(f"{store_path}: {where}: missing {name} chunk (reads as fill value {IGNORE}); "
                               f"run bevctl verify {store_path} --repair, then rerun the job", token,
                               None if c is None else cameras[c])  # type: ignore[index]
    if data is None:  # the whole read failed but no slab alone did (e.g. a transient store error)
        raise CorruptChunk(f"{store_path}: sample '{token}': unreadable {name} ({_reason(error)})", token, None)
    return data
