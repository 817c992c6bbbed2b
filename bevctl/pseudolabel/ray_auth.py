"""Ray's token authentication for the clusters the pseudo-label job starts or joins.

A local Ray cluster's GCS and raylets listen on every network interface of the machine: without
authentication anyone who can reach them runs code as the user who started the job. Ray (>= 2.52)
checks a shared token on every request when ``RAY_AUTH_MODE=token``; the token comes from
``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``.
bevctl never turns authentication off.

Local cluster (no ``--address``)
    Token mode is on: Ray's default for a local cluster since 2.59 (the variable unset), or
    ``RAY_AUTH_MODE=token``; an explicit opt-out is obeyed, with a warning. Unless a token is
    given, bevctl points Ray (``RAY_AUTH_TOKEN_PATH``) at a token of its own instead of letting
    Ray write ``~/.ray/auth_token``, which Ray 2.60 creates readable by everyone (0644): a
    random token, made once per process in a fresh directory of the system temp dir (0700), the
    file 0600, deleted when the process exits. Every process of the cluster (GCS, raylet,
    workers, restarted actors) inherits the variable. A ``RAY_AUTH_TOKEN_PATH`` file that others
    can read is made 0600 (logged). One token per process because Ray caches the token it
    loaded for the life of the process.
Joining a cluster (``--address``)
    The cluster's own settings, as for any Ray client: Ray sends a token to an explicit address
    only with ``RAY_AUTH_MODE=token`` (``auto`` finds ``~/.ray/auth_token`` by itself). bevctl
    does not change them (Ray reads its config once, when imported); a refused connection is
    one error line naming the variables (:func:`join_error`).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from bevctl.errors import BevctlError

log = logging.getLogger(__name__)

MODE = "RAY_AUTH_MODE"
TOKEN = "RAY_AUTH_TOKEN"
TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
_own_token: Path | None = None  # this process's token file, once made
# Ray's logger for its notices about token authentication (ray._private.authentication)
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _QuietTokenOnNotice(logging.Filter):
    """Drops Ray's notice that token authentication is on, which goes on to say how to turn it
    off: bevctl logs which token the cluster uses instead. Every other record passes (Ray's
    warning that authentication is *off* stays loud)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


_QUIET = _QuietTokenOnNotice()


def prepare_local_cluster() -> None:
    """Before ``ray.init()`` starts a local cluster: a private token file (or a warning)."""
    # Unset: Ray (>= 2.59) turns token mode on for a local ray.init(), in this process too (setting
    # the variable here would reach the cluster's processes but not Ray's config, already loaded).
    mode = os.environ.get(MODE, "token")
    if mode.lower() != "token":
        log.warning("%s=%s: the local Ray cluster accepts code from anyone who can reach this machine's "
                    "network ports (unset it to use token authentication)", MODE, mode)
        return
    if os.environ.get(TOKEN):
        log.info("Ray token authentication: token from %s", TOKEN)
        return
    given = os.environ.get(TOKEN_PATH)
    if given and Path(given) != _own_token:
        _make_private(Path(given))
        log.info("Ray token authentication: token file %s (%s)", given, TOKEN_PATH)
        return
    path = _own_token_path()
    os.environ[TOKEN_PATH] = str(path)
    logging.getLogger(RAY_AUTH_LOGGER).addFilter(_QUIET)  # adding the same filter twice keeps one
    log.info("Ray token authentication: token file %s (mode 0600, this run's own)", path)


def join_error(address: str, error: BaseException) -> BevctlError:
    """One line for a failed ``ray.init(address=...)``; names the token settings when the cluster
    refused (or this process had no) token."""
    give = f"give the cluster's token in {TOKEN} or in a file named by {TOKEN_PATH}, with {MODE}=token"
    if "InvalidAuthToken" in f"{error} {error.__cause__ or ''}":
        mode = os.environ.get(MODE, "unset")
        why = "missing or wrong" if mode.lower() == "token" else f"not sent: {MODE} is {mode}"
        return BevctlError(f"--address {address}: the Ray cluster refused the connection: authentication token "
                           f"{why} ({give})")
    if type(error).__name__ == "AuthenticationError":  # token mode, and Ray found no token to send
        return BevctlError(f"--address {address}: {MODE}=token but no Ray authentication token was found ({give})")
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return BevctlError(f"--address {address}: cannot connect to the Ray cluster ({first})")


def _own_token_path() -> Path:
    global _own_token
    if _own_token is None:
        directory = Path(tempfile.mkdtemp(prefix="bevctl-ray-auth-"))  # 0700, unpredictable name
        path = directory / "auth_token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        atexit.register(shutil.rmtree, directory, True)
        _own_token = path
    return _own_token


def _make_private(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        raise BevctlError(f"{TOKEN_PATH}={path}: cannot read the Ray token file ({e.strerror})") from None
    if mode & 0o077:
        try:
            os.chmod(path, 0o600)
        except OSError as e:
            raise BevctlError(f"{TOKEN_PATH}={path}: the Ray token file is readable by others (mode {mode:o}) "
                              f"and cannot be made private ({e.strerror}): chmod 600 it") from None
        log.warning("%s: the Ray token file was readable by others (mode %o); made it 0600", path, mode)
