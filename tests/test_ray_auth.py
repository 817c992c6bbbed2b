"""Ray's token authentication around the pseudo-label job (bevctl.pseudolabel.ray_auth): the
private token file of a local cluster, a token file others can read, and joining a cluster
without a token. A stranger refused by a running job's cluster: tests/reliability/test_security.py."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bevctl.errors import BevctlError
from bevctl.pseudolabel import ray_auth


@pytest.fixture
def no_ray_auth(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No RAY_AUTH_* variable, no token made yet in this process, temp files under tmp_path."""
    for name in (ray_auth.MODE, ray_auth.TOKEN, ray_auth.TOKEN_PATH):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_auth, "_own_token", None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_rays_advice_to_turn_token_auth_off_is_not_shown_for_bevctls_own_cluster(no_ray_auth: Path) -> None:
    ray_logger = logging.getLogger(ray_auth.RAY_AUTH_LOGGER)

    def shown(message: str) -> bool:
        record = ray_logger.makeRecord(ray_logger.name, logging.WARNING, __file__, 0, message, None, None)
        return ray_logger.filter(record)

    on = (f"Token authentication is enabled for this Ray cluster. Set {ray_auth.MODE}=disabled to opt out. "
          "For more information, see https://docs.ray.io/en/latest/ray-security/token-auth.html")  # Ray's text
    off = "Token authentication is disabled for this Ray cluster. Anyone with network access ..."
    ray_auth.prepare_local_cluster()
    try:
        assert not shown(on) and shown(off)
    finally:
        ray_logger.removeFilter(ray_auth._QUIET)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_local_cluster_gets_a_token_file_only_its_owner_can_read(no_ray_auth: Path) -> None:
    ray_auth.prepare_local_cluster()
    path = Path(os.environ[ray_auth.TOKEN_PATH])
    assert path.parent.parent == no_ray_auth  # a fresh directory of the temp dir, not ~/.ray
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert ray_auth.MODE not in os.environ  # left to Ray, whose local clusters default to token mode
    ray_auth.prepare_local_cluster()  # a second cluster of this process: the same token (Ray caches it)
    assert Path(os.environ[ray_auth.TOKEN_PATH]) == path and path.read_text() == token


def test_a_given_token_file_readable_by_others_is_made_private(no_ray_auth: Path, monkeypatch, caplog) -> None:
    given = no_ray_auth / "shared_token"
    given.write_text("a" * 64)
    given.chmod(0o644)  # what Ray 2.60 writes to ~/.ray/auth_token
    monkeypatch.setenv(ray_auth.TOKEN_PATH, str(given))
    with caplog.at_level(logging.WARNING, logger=ray_auth.__name__):
        ray_auth.prepare_local_cluster()
    assert _mode(given) == 0o600 and given.read_text() == "a" * 64
    assert os.environ[ray_auth.TOKEN_PATH] == str(given)  # the user's token is the one used
    assert f"{given}: the Ray token file was readable by others (mode 644); made it 0600" in caplog.text


def test_a_missing_token_file_is_one_error(no_ray_auth: Path, monkeypatch) -> None:
    monkeypatch.setenv(ray_auth.TOKEN_PATH, str(no_ray_auth / "nope"))
    with pytest.raises(BevctlError, match="RAY_AUTH_TOKEN_PATH=.*nope: cannot read the Ray token file"):
        ray_auth.prepare_local_cluster()


def test_a_token_in_the_environment_writes_no_file(no_ray_auth: Path, monkeypatch) -> None:
    monkeypatch.setenv(ray_auth.TOKEN, "b" * 64)
    ray_auth.prepare_local_cluster()
    assert ray_auth.TOKEN_PATH not in os.environ and not list(no_ray_auth.iterdir())


def test_joining_a_cluster_without_a_token_is_one_error_line(tiny_synth, tmp_path: Path) -> None:
    """Token mode and no token anywhere (another HOME): refused before connecting (loopback only)."""
    root, version = tiny_synth
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token", BEVCTL_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "bevctl.cli", "pseudolabel", "--dataroot", str(root), "--version",
                           version, "--model", "synth-gt", "--workers", "1", "--address", "127.0.0.1:9",
                           "--out", str(tmp_path / "labels.zarr")], env=env, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "--address 127.0.0.1:9: RAY_AUTH_MODE=token but no Ray authentication token was found" in errors[0]
    assert "RAY_AUTH_TOKEN " in errors[0] and "RAY_AUTH_TOKEN_PATH" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "labels.zarr").exists()


@pytest.mark.parametrize("mode,why", [("token", "missing or wrong"), (None, "not sent: RAY_AUTH_MODE is unset")])
def test_a_refused_connection_names_the_token_settings(mode: str | None, why: str, no_ray_auth, monkeypatch) -> None:
    if mode:
        monkeypatch.setenv(ray_auth.MODE, mode)
    refused = ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    refused.__cause__ = RuntimeError("Failed to connect to GCS. Last connection error: ... RPC error: InvalidAuthToken")
    message = str(ray_auth.join_error("10.0.0.1:6379", refused))
    assert message.startswith(f"--address 10.0.0.1:6379: the Ray cluster refused the connection: authentication "
                              f"token {why} (give the cluster's token in RAY_AUTH_TOKEN or in a file named by "
                              f"RAY_AUTH_TOKEN_PATH, with RAY_AUTH_MODE=token)")
    down = ray_auth.join_error("10.0.0.1:6379", ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379"))
    assert str(down) == "--address 10.0.0.1:6379: cannot connect to the Ray cluster (Failed to connect to Ray cluster at 10.0.0.1:6379)"
