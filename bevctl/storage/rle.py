"""``bevctl_rle``: a Zarr v3 bytes-to-bytes codec that run-length encodes a byte stream.

Label masks are piecewise constant: a 450x800 synthetic-world mask has ~1000 runs for 360k
pixels. Run-length coding first and zstd after (``compressors=(RunLengthCodec(),
ZstdCodec(level=15))`` on a uint8 array) stores them in ~0.43-0.48x the bytes of the same masks
as PNG at about a millisecond per mask, where Blosc-zstd-bitshuffle alone lands at ~1x PNG.

Encoded layout (little endian)::

    uint32 n                 number of runs
    uint8  values[n]         the byte value of each run
    uint8  lengths[4][n]     run lengths as uint32, split into byte planes (low plane first),
                             so zstd sees long stretches of zero high bytes

Registered with zarr under ``bevctl_rle`` on import of this module and through the
``zarr.codecs`` entry point in pyproject.toml, so any Python with bevctl installed reads
stores that use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import ZstdCodec
from zarr.core.buffer.cpu import as_numpy_array_wrapper
from zarr.registry import register_codec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer
    from zarr.core.common import JSON

CODEC_NAME = "bevctl_rle"


def rle_encode(data: np.ndarray) -> bytes:
    """Bytes -> run-length encoding (see module docstring)."""
    flat = np.ascontiguousarray(data).view(np.uint8).ravel()
    if flat.size == 0:
        return np.uint32(0).tobytes()
    if flat.size >= 1 << 32:
        raise ValueError("bevctl_rle: chunks must be < 4 GiB")
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    lengths = np.diff(np.append(starts, flat.size)).astype("<u4")
    planes = lengths.view(np.uint8).reshape(-1, 4).T  # (4, n): low byte plane first
    return np.uint32(starts.size).tobytes() + flat[starts].tobytes() + np.ascontiguousarray(planes).tobytes()


def rle_decode(data: np.ndarray) -> np.ndarray:
    """Run-length encoding -> uint8 bytes."""
    buf = np.ascontiguousarray(data).view(np.uint8).ravel()
    if buf.size < 4:
        raise ValueError("bevctl_rle: truncated chunk")
    n = int(buf[:4].view("<u4")[0])
    if buf.size != 4 + 5 * n:
        raise ValueError(f"bevctl_rle: chunk of {buf.size} bytes cannot hold {n} runs")
    values = buf[4 : 4 + n]
    lengths = np.ascontiguousarray(buf[4 + n :].reshape(4, n).T).view("<u4").ravel()
    return np.repeat(values, lengths)


@dataclass(frozen=True)
class RunLengthCodec(BytesBytesCodec):
    """Run-length coding of bytes; put a general compressor (zstd) after it."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        if data.get("name") != CODEC_NAME or data.get("configuration", {}) not in ({}, None):
            raise ValueError(f"not a {CODEC_NAME} codec: {data}")
        return cls()

    def to_dict(self) -> dict[str, JSON]:
        return {"name": CODEC_NAME}

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        return as_numpy_array_wrapper(rle_decode, chunk_bytes, chunk_spec.prototype)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer | None:
        return as_numpy_array_wrapper(
            lambda a: np.frombuffer(rle_encode(a), dtype=np.uint8), chunk_bytes, chunk_spec.prototype
        )

    async def _encode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_bytes, chunk_spec)

    def compute_encoded_size(self, _input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError


def mask_compressors(level: int = 15) -> tuple[BytesBytesCodec, ...]:
    """Compressors for uint8 label masks: run-length coding, then zstd."""
    return (RunLengthCodec(), ZstdCodec(level=level))


register_codec(CODEC_NAME, RunLengthCodec)
