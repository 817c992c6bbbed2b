"""``bevctl verify STORE``: check a pseudo-label store or GT cache chunk by chunk.

What is checked (local path or URL):

1. metadata: the group ``zarr.json`` parses and carries the ``bevctl`` attributes; ``tokens``,
   ``done`` and every data array open, with the sample count and shapes the metadata says; the
   token list matches its recorded digest (``tokens_sha256``) and has no duplicates; each
   array's own ``zarr.json`` parses and equals its copy in the consolidated metadata (``--repair``
   rewrites it from there); with a dataroot, the tokens are the dataset's samples of the
   version and splits the store records, in the job's order;
2. every sample marked DONE: every chunk of every data array (``masks`` and ``confidence``, or
   ``bev``) exists, decodes (zstd / crc32c checksums: a flipped bit, a truncated or zero-filled
   chunk fails) and, for class-id arrays with fill value 255, is not all fill.

Samples are checked in a thread pool (chunk reads are I/O: object stores answer in parallel).
``repair=True`` marks the damaged samples TODO, so that rerunning the same ``pseudolabel`` /
``prepare-gt`` command redoes exactly those (their chunks are rewritten whole). Damaged metadata
cannot be repaired by marking samples: rebuild the store (the same command with ``--overwrite``).
Do not run ``--repair`` while a job is writing the store (the driver alone writes ``done``).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from zarr.core.buffer import default_buffer_prototype

from bevctl.data.nuscenes import load_index
from bevctl.errors import BevctlError
from bevctl.storage import location
from bevctl.storage.base import ATTRS_KEY, DONE, TODO, SampleStore, tokens_digest
from bevctl.storage.codecs import IGNORE, is_checked

# kind -> (data arrays always present, optional ones named by a metadata flag, command that makes it)
KINDS: dict[str, tuple[tuple[str, ...], dict[str, str], str]] = {
    "pseudolabels": (("masks",), {"confidence": "confidence"}, "bevctl pseudolabel"),
    "bev_gt": (("bev",), {}, "bevctl prepare-gt"),
}


@dataclass
class VerifyReport:
    path: str
    kind: str = "?"
    samples: int = 0
    done: int = 0
    chunks_checked: int = 0
    checksums: bool = True  # False: a store of the old layout (no checksums, fill 0)
    seconds: float = 0.0
    metadata_errors: list[str] = field(default_factory=list)
    damaged: dict[str, list[str]] = field(default_factory=dict)  # token -> what is wrong
    array_files: dict[str, str] = field(default_factory=dict)  # array -> what is wrong with its zarr.json
    repaired: int = 0
    repaired_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.metadata_errors and not self.damaged and not self.array_files


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0][:100] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_kind(path: str) -> str:
    """The ``bevctl.kind`` of the store's group attributes (a metadata error if unreadable)."""
    try:
        meta = json.loads(location.read_bytes(location.join(path, "zarr.json")))
    except FileNotFoundError:
        raise BevctlError("zarr.json is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BevctlError(f"zarr.json is not valid JSON ({_reason(e)})") from None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    info = attrs.get(ATTRS_KEY) if isinstance(attrs, dict) else None
    if not isinstance(info, dict) or info.get("kind") not in KINDS:
        raise BevctlError("zarr.json has no bevctl attributes of a known kind (pseudolabels, bev_gt)")
    return str(info["kind"])


def _open(path: str, report: VerifyReport) -> tuple[SampleStore, list[zarr.Array]] | None:
    """The store and its data arrays, or None with ``report.metadata_errors`` filled."""
    try:
        kind = _read_kind(path)
    except BevctlError as e:
        report.metadata_errors.append(str(e))
        return None
    report.kind = kind
    required, optional, _command = KINDS[kind]
    try:
        store = SampleStore.open(path, kind, mode="r")
    except BevctlError as e:
        report.metadata_errors.append(str(e).removeprefix(f"{path}: "))
        return None
    except Exception as e:  # noqa: BLE001 - a torn tokens/done array raises anything
        report.metadata_errors.append(f"cannot read tokens or done ({_reason(e)})")
        return None
    errors = report.metadata_errors
    n = int(store.info.get("num_samples", -1))
    report.samples = len(store.tokens)
    if len(store.tokens) != n:
        errors.append(f"tokens holds {len(store.tokens)} samples, the metadata says {n}")
    if tokens_digest(store.tokens) != store.info.get("tokens_sha256"):
        errors.append("tokens do not match their recorded digest (tokens_sha256)")
    names = list(required) + [a for a, flag in optional.items() if store.metadata.get(flag)]
    arrays = []
    for name in ["done", *names]:
        try:
            arr = store.array(name)
        except Exception as e:  # noqa: BLE001 - KeyError, JSON errors, codec errors from a torn zarr.json
            errors.append(f"array '{name}' does not open ({_reason(e)})")
            continue
        if arr.shape[0] != n:
            errors.append(f"array '{name}' has {arr.shape[0]} samples, the metadata says {n}")
        elif name != "done":
            arrays.append(arr)
    if kind == "pseudolabels" and arrays:
        res = store.metadata.get("resolution")
        cams = store.metadata.get("cameras")
        for arr in arrays:
            if not isinstance(res, list) or not isinstance(cams, list) or tuple(arr.shape[1:]) != (len(cams), *res):
                errors.append(f"array '{arr.name.strip('/')}' is {tuple(arr.shape)}, the metadata says "
                              f"{len(cams) if isinstance(cams, list) else '?'} cameras at {res}")
    try:
        store.status()
    except Exception as e:  # noqa: BLE001
        errors.append(f"the done record does not decode ({_reason(e)})")
    if errors:
        return None
    _check_array_files(path, store, report)
    report.checksums = all(is_checked(a) for a in arrays if a.name.strip("/") in ("masks", "bev"))
    return store, arrays


def dataset_tokens(kind: str, metadata: dict[str, Any], dataroot: str) -> tuple[list[str], str]:
    """(the sample tokens the job that made this store would use, a description) from the
    dataset at ``dataroot``, with the version and splits the store records."""
    if kind == "pseudolabels":
        version, splits = str(metadata.get("dataset_version")), list(metadata.get("splits") or [])
    else:
        dataset = metadata.get("dataset") or {}
        version, splits = str(dataset.get("version")), list(dataset.get("splits") or [])
    index = load_index(dataroot, version, check_images=False)
    tokens = list(dict.fromkeys(s.token for split in splits for s in index.samples_in(split)))
    return tokens, f"{dataroot}/{version} splits {','.join(splits)}"


def _check_dataset(store: SampleStore, kind: str, dataroot: str, report: VerifyReport) -> None:
    tokens, where = dataset_tokens(kind, store.metadata, dataroot)
    if tokens == store.tokens:
        return
    if len(tokens) != len(store.tokens):
        report.metadata_errors.append(f"the store holds {len(store.tokens)} samples, {where} has {len(tokens)}")
        return
    i = next(k for k, (a, b) in enumerate(zip(store.tokens, tokens)) if a != b)
    report.metadata_errors.append(f"sample {i} is '{store.tokens[i]}' in the store, '{tokens[i]}' in {where}")


def _check_array_files(path: str, store: SampleStore, report: VerifyReport) -> None:
    """Each array's own ``zarr.json``: zarr-python reads the consolidated copy in the group's
    ``zarr.json`` (written at the end of a job), other readers the array's own file, so a
    damaged one goes unnoticed by bevctl itself. ``report.fixable``: arrays whose file can be
    rewritten from the consolidated copy."""
    root = json.loads(location.read_bytes(location.join(path, "zarr.json")))
    consolidated = (root.get("consolidated_metadata") or {}).get("metadata") or {}
    names = sorted(n for n, meta in consolidated.items() if meta.get("node_type") == "array") if consolidated else []
    for name in names or [n for n, _ in store.group.arrays()]:
        key = location.join(path, name, "zarr.json")
        try:
            own = json.loads(location.read_bytes(key))
        except FileNotFoundError:
            problem = "is missing"
        except (ValueError, UnicodeDecodeError):
            problem = "is not valid JSON"
        else:
            if not consolidated or own == consolidated.get(name):
                continue
            problem = "differs from the consolidated copy in the group's zarr.json"
        report.array_files[name] = problem


def _rewrite_array_file(path: str, store: SampleStore, name: str) -> None:
    """``<name>/zarr.json`` from the consolidated copy, byte for byte as zarr writes it."""
    metadata = store.array(name).metadata  # read from the consolidated metadata
    data = metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
    location.write_bytes_atomic(location.join(path, name, "zarr.json"), data)


def _chunk_coords(arr: zarr.Array, i: int) -> list[tuple[int, ...]]:
    """Chunk grid coordinates of sample ``i`` (chunks hold one sample along axis 0)."""
    grid = [range(-(-s // c)) for s, c in zip(arr.shape[1:], arr.chunks[1:])]
    coords = [()]  # type: list[tuple[int, ...]]
    for axis in grid:
        coords = [(*c, k) for c in coords for k in axis]
    return [(i // arr.chunks[0], *c) for c in coords]


def _check_sample(path: str, arrays: list[zarr.Array], i: int, cameras: list[str] | None) -> tuple[list[str], int]:
    """(what is wrong with sample ``i``, chunks checked)."""
    problems: list[str] = []
    n = 0
    for arr in arrays:
        name = arr.name.strip("/")
        checked = is_checked(arr)
        for coords in _chunk_coords(arr, i):
            n += 1
            per_camera = cameras and arr.ndim == 4 and arr.chunks[1] == 1  # the old layout: a chunk per camera
            where = f"{name}" + (f" camera {cameras[coords[1]]}" if per_camera else "")
            key = arr.metadata.encode_chunk_key(coords)
            if not location.is_file(location.join(path, name, *key.split("/"))):
                problems.append(f"{where}: chunk {key} missing")
                continue
            sel = tuple(slice(c * k, (c + 1) * k) for c, k in zip(coords, arr.chunks))
            try:
                block = np.asarray(arr[sel])
            except Exception as e:  # noqa: BLE001 - checksum, truncation, bad frame
                problems.append(f"{where}: chunk {key} corrupt ({_reason(e)})")
                continue
            if checked and block.size and bool((block == IGNORE).all()):
                problems.append(f"{where}: chunk {key} holds only the fill value {IGNORE}")
    return problems, n


def verify_store(path: str, workers: int = 8, repair: bool = False, progress: bool = True,
                 dataroot: str | None = None) -> VerifyReport:
    """Check ``path`` (module docstring); with ``repair`` mark damaged samples TODO. With
    ``dataroot``, the token list must also be the dataset's (same version and splits)."""
    path = str(path)
    location.check(path)
    report = VerifyReport(path=path)
    start = time.perf_counter()
    if not location.is_dir(path) and not location.is_file(location.join(path, "zarr.json")):
        raise BevctlError(f"{path}: no store there")
    opened = _open(path, report)
    if opened is None:
        report.seconds = time.perf_counter() - start
        return report
    store, arrays = opened
    if dataroot is not None:
        _check_dataset(store, report.kind, dataroot, report)
        if report.metadata_errors:
            report.seconds = time.perf_counter() - start
            return report
    cameras = None
    if report.kind == "pseudolabels":
        cameras = [str(c) for c in store.metadata.get("cameras", [])]
    status = store.status()
    done_idx = [int(i) for i in np.flatnonzero(status == DONE)]
    report.done = len(done_idx)

    bar = Progress(TextColumn("verify"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=False)
    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        task = bar.add_task("samples", total=len(done_idx))
        futures = {i: pool.submit(_check_sample, path, arrays, i, cameras) for i in done_idx}
        for i, fut in futures.items():
            problems, n = fut.result()
            report.chunks_checked += n
            if problems:
                report.damaged[store.tokens[i]] = problems
            bar.advance(task)
    if repair and report.array_files:
        for name in report.array_files:
            _rewrite_array_file(path, store, name)
            report.repaired_files.append(f"{name}/zarr.json")
    if repair and report.damaged:
        store = SampleStore.open(path, report.kind, mode="r+")
        store.mark([store.index_of(t) for t in report.damaged], TODO)
        report.repaired = len(report.damaged)
    report.seconds = time.perf_counter() - start
    return report


def format_report(r: VerifyReport, limit: int = 50) -> str:
    command = KINDS.get(r.kind, ((), {}, "the command that made it"))[2]
    if r.metadata_errors:
        lines = [f"verify: {r.path}: metadata damaged ({len(r.metadata_errors)} problem(s)); the samples "
                 "cannot be checked"]
        lines += [f"  damaged: {e}" for e in r.metadata_errors]
        lines.append(f"  rebuild the store: rerun {command} with --overwrite (marking samples cannot fix metadata)")
        return "\n".join(lines)
    head = (f"verify: {r.path}: {r.kind}, {r.samples} samples, {r.done} done; {r.chunks_checked} chunks checked "
            f"in {r.seconds:.1f} s: ")
    lines = [head + ("all good" if r.ok else f"{len(r.damaged)} damaged sample(s)"
                     + (f", {len(r.array_files)} damaged array metadata file(s)" if r.array_files else ""))]
    for name, problem in r.array_files.items():
        lines.append(f"  damaged: {name}/zarr.json {problem}")
    if not r.checksums:
        lines.append("  note: a store of the old layout (fill value 0, no checksums): a deleted chunk or a flipped "
                     "bit may go unnoticed; rebuild it with --overwrite to get both")
    for k, (token, problems) in enumerate(r.damaged.items()):
        if k == limit:
            lines.append(f"  ... and {len(r.damaged) - limit} more")
            break
        lines.append(f"  damaged: sample {token}: " + "; ".join(problems))
    if r.repaired_files:
        lines.append(f"  repaired: rewrote {', '.join(r.repaired_files)} from the consolidated metadata")
    if r.repaired:
        lines.append(f"  repaired: {r.repaired} sample(s) marked todo; rerun {command} with the same options "
                     "to redo exactly those")
    elif r.damaged or (r.array_files and not r.repaired_files):
        lines.append(f"  run bevctl verify {r.path} --repair" + (f", then rerun {command} with the same options"
                                                                 if r.damaged else ""))
    return "\n".join(lines)


def as_dict(r: VerifyReport) -> dict[str, Any]:
    return {"path": r.path, "kind": r.kind, "samples": r.samples, "done": r.done, "chunks_checked": r.chunks_checked,
            "checksums": r.checksums, "seconds": round(r.seconds, 3), "ok": r.ok,
            "metadata_errors": r.metadata_errors, "damaged": r.damaged, "array_files": r.array_files,
            "repaired": r.repaired, "repaired_files": r.repaired_files}
