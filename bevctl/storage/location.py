"""Where bevctl writes and reads back its own outputs: a local path or a URL.

Every store and run path (``--out``, ``--labels``, ``--gt``, ``--init``, ``--checkpoint``,
evaluation reports) goes through this module. A *target* is a string (or ``Path``):

- a local path (``runs/pre``) or a ``file://`` URL (``file:///data/runs/pre``): the local
  file system, written atomically with a temp file + rename (:mod:`bevctl.io`);
- any other URL (``s3://bucket/key``, ``gs://``, ``az://``, ``memory://``, ...): an fsspec
  file system for that protocol (``s3fs`` for S3: ``pip install 'bevctl[s3]'``). One object is
  written with one PUT of the whole object, which readers see whole or not at all.

Zarr stores on a URL use ``zarr.storage.FsspecStore`` (local ones ``LocalStore``):
:func:`zarr_store`.

Credentials come only from the environment of the process, the way the protocol's own library
reads them (S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` or
``AWS_PROFILE`` and ``~/.aws``, an S3-compatible server via ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``; fsspec's own configuration, e.g. ``FSSPEC_S3_ENDPOINT_URL``). bevctl
never writes them anywhere: stores, checkpoints and run files record the URL only.

Storage faults (unknown protocol, missing package, missing bucket, no credentials, endpoint
unreachable) become one :class:`~bevctl.errors.BevctlError` line naming the target.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from zarr.storage import FsspecStore, LocalStore

from bevctl.errors import BevctlError
from bevctl.io import atomic_write

Target = str | os.PathLike

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_checked_roots: set[tuple[str, str]] = set()  # (protocol, bucket) already found reachable in this process


def protocol(target: Target) -> str | None:
    """The URL scheme (``s3``, ``file``, ...), or None for a plain path."""
    m = _URL.match(str(target))
    return m.group(1).lower() if m else None


def local_path(target: Target) -> Path | None:
    """The local path of a plain path or ``file://`` URL; None for any other URL."""
    text = str(target)
    proto = protocol(text)
    if proto is None:
        return Path(text)
    if proto in ("file", "local"):
        rest = text[len(proto) + 3:]
        if rest and not rest.startswith("/"):
            raise BevctlError(f"{text}: a file:// URL needs an absolute path (file:///abs/path)")
        return Path(rest or "/")
    return None


def is_local(target: Target) -> bool:
    return local_path(target) is not None


def absolute(target: Target) -> str:
    """A URL as it is; a plain path made absolute (what runs and stores record, so that they
    still name the same data when read from another directory)."""
    text = str(target)
    return text if protocol(text) is not None else str(Path(text).expanduser().absolute())


def join(base: Target, *parts: str) -> str:
    """``base/part/...`` for a path or a URL (URLs always join with ``/``)."""
    text = str(base)
    if protocol(text) is None:
        return str(Path(text, *parts))
    return posixpath.join(text.rstrip("/") if not text.endswith("://") else text, *parts)


def with_suffix(target: Target, suffix: str) -> str:
    """``eval.json`` -> ``eval.md`` for a path or a URL."""
    text = str(target)
    if protocol(text) is None:
        return str(Path(text).with_suffix(suffix))
    head, name = text.rsplit("/", 1)
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head}/{stem}{suffix}"


# ---- errors ------------------------------------------------------------------------------------


def _error_line(target: Target, e: BaseException) -> str:
    name = type(e).__name__
    proto = protocol(target) or "file"
    text = str(e).splitlines()[0][:200] if str(e) else name
    if isinstance(e, ImportError):
        extra = " (pip install 'bevctl[s3]')" if proto in ("s3", "s3a") else ""
        return f"{target}: the '{proto}://' protocol needs a package that is not installed: {text}{extra}"
    if isinstance(e, ValueError) and "protocol not known" in text.lower():
        return f"{target}: unknown storage protocol '{proto}://'"
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return (f"{target}: no credentials for {proto}:// ({text}); set them in the environment, e.g. "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or isinstance(
            e, ConnectionError):
        return f"{target}: cannot reach the storage endpoint ({text}); check AWS_ENDPOINT_URL / the network"
    if isinstance(e, PermissionError):
        return f"{target}: access denied ({text}); check the credentials in the environment"
    if isinstance(e, FileNotFoundError):
        return f"{target}: not found ({text})"
    return f"{target}: storage error ({name}: {text})"


_STORAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, ImportError)


def _botocore_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415 - botocore: optional (the s3 extra)
    except ImportError:
        return ()
    return (BotoCoreError, ClientError)


@contextlib.contextmanager
def storage_errors(target: Target) -> Iterator[None]:
    """Turn a storage fault while working on ``target`` into one BevctlError line."""
    try:
        yield
    except BevctlError:
        raise
    except (*_STORAGE_ERRORS, *_botocore_errors()) as e:
        raise BevctlError(_error_line(target, e)) from None
    except ValueError as e:
        if "protocol not known" in str(e).lower():
            raise BevctlError(_error_line(target, e)) from None
        raise


# ---- remote file systems -----------------------------------------------------------------------


def remote(target: Target) -> tuple[Any, str]:
    """``(fsspec file system, path in it)`` of a URL that is not local. The first use of a
    bucket in this process checks that it exists and the credentials work."""
    text = str(target)
    proto = protocol(text)
    if proto is None or local_path(text) is not None:
        raise ValueError(f"{text} is local")
    with storage_errors(text):
        from fsspec.core import url_to_fs  # noqa: PLC0415 - fsspec: only for URLs

        fs, path = url_to_fs(text)
        # other processes (labeler actors, DataLoader workers, another run) write here too: never
        # answer from a listing cached earlier (these calls are few; chunk I/O goes through zarr)
        fs.invalidate_cache()
        bucket = path.split("/", 1)[0]
        key = (proto, bucket)
        if not path.startswith("/") and bucket and key not in _checked_roots:
            try:
                fs.info(bucket)  # raises on missing credentials too (``exists`` would say False)
            except FileNotFoundError:
                raise BevctlError(f"{text}: bucket '{bucket}' does not exist (or these credentials cannot see it)") from None
            except PermissionError:
                pass  # a policy scoped to a prefix may not allow looking at the bucket itself
            _checked_roots.add(key)
    return fs, path


def check(target: Target) -> None:
    """Fail early, with one line, if ``target`` names an unusable protocol or bucket."""
    if not is_local(target):
        remote(target)


# ---- files ---------------------------------------------------------------------------------------


def exists(target: Target) -> bool:
    p = local_path(target)
    if p is not None:
        return p.exists()
    fs, path = remote(target)
    with storage_errors(target):
        return bool(fs.exists(path))


def is_file(target: Target) -> bool:
    p = local_path(target)
    if p is not None:
        return p.is_file()
    fs, path = remote(target)
    with storage_errors(target):
        return bool(fs.isfile(path))


def is_dir(target: Target) -> bool:
    p = local_path(target)
    if p is not None:
        return p.is_dir()
    fs, path = remote(target)
    with storage_errors(target):
        return bool(fs.isdir(path))


def read_bytes(target: Target) -> bytes:
    """The whole file; FileNotFoundError if there is none (other faults: one BevctlError line)."""
    p = local_path(target)
    if p is not None:
        return p.read_bytes()
    fs, path = remote(target)
    try:
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{target}: not found") from None
    except Exception:
        with storage_errors(target):
            raise


def read_text(target: Target) -> str:
    return read_bytes(target).decode()


def write_atomic(target: Target, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` and put the result at ``target`` whole: locally a temp file renamed
    into place, on object storage one PUT of the whole object."""
    p = local_path(target)
    if p is not None:
        atomic_write(p, write)
        return
    buf = io.BytesIO()
    write(buf)
    write_bytes_atomic(target, buf.getvalue())


def write_bytes_atomic(target: Target, data: bytes) -> None:
    p = local_path(target)
    if p is not None:
        atomic_write(p, lambda f: f.write(data))
        return
    fs, path = remote(target)
    with storage_errors(target):
        fs.pipe_file(path, data)


def write_text_atomic(target: Target, text: str) -> None:
    write_bytes_atomic(target, text.encode())


def copy_file(src: Target, dst: Target) -> None:
    """Replace ``dst`` by a copy of ``src`` whole (locally: hard link or copy, renamed into
    place; object storage: one server-side copy)."""
    sp, dp = local_path(src), local_path(dst)
    if sp is not None and dp is not None:
        tmp = dp.with_name(f".{dp.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(sp, tmp)
        except OSError:
            shutil.copyfile(sp, tmp)
        os.replace(tmp, dp)
        return
    if sp is None and dp is None and protocol(src) == protocol(dst):
        fs, spath = remote(src)
        _, dpath = remote(dst)
        with storage_errors(dst):
            fs.copy(spath, dpath)
        return
    write_bytes_atomic(dst, read_bytes(src))


def listdir(target: Target) -> list[str]:
    """Names (not paths) directly under ``target``; [] if there is nothing."""
    p = local_path(target)
    if p is not None:
        return sorted(os.listdir(p)) if p.is_dir() else []
    fs, path = remote(target)
    with storage_errors(target):
        if not fs.exists(path):
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in fs.ls(path, detail=False))


def remove(target: Target) -> None:
    """Delete one file; nothing if it is not there."""
    p = local_path(target)
    if p is not None:
        p.unlink(missing_ok=True)
        return
    fs, path = remote(target)
    with storage_errors(target):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def remove_tree(target: Target) -> None:
    """Delete ``target`` and everything under it; nothing if it is not there."""
    p = local_path(target)
    if p is not None:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return
    fs, path = remote(target)
    with storage_errors(target):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def makedirs(target: Target) -> None:
    """Create a local directory (object stores have none to create)."""
    p = local_path(target)
    if p is not None:
        p.mkdir(parents=True, exist_ok=True)


def du(target: Target) -> int:
    """Bytes of every file under ``target``."""
    p = local_path(target)
    if p is not None:
        total = 0
        for root, _dirs, files in os.walk(p):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(root, name))
                except FileNotFoundError:
                    pass
        return total
    fs, path = remote(target)
    with storage_errors(target):
        return int(fs.du(path, total=True)) if fs.exists(path) else 0


# ---- zarr ----------------------------------------------------------------------------------------


def zarr_store(target: Target, read_only: bool = False) -> Any:
    """The Zarr v3 store for ``target``: ``LocalStore`` for a local path, ``FsspecStore``
    (an async fsspec file system, e.g. s3fs) for a URL."""
    p = local_path(target)
    if p is not None:
        return LocalStore(p, read_only=read_only)
    remote(target)  # one clear line for a bad protocol, package, bucket or credentials
    with storage_errors(target):
        return FsspecStore.from_url(str(target), read_only=read_only)
