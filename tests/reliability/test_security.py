"""Untrusted files: checkpoints of another preset, truncated checkpoints, a crafted pickle that
would run code when loaded, and a Hugging Face model directory that asks for remote code.
Each is refused with one ``error:`` line naming the file; the crafted ones never run code
(``torch.load(weights_only=True)``, ``trust_remote_code=False``): their marker file never
appears. And the pseudo-label job's local Ray cluster, which listens on every network interface:
a stranger without its token cannot run code on it (with a negative control)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch
from faultkit import bevctl_cmd, count_chunk_files, reap_group, store_files, temp_leftovers

from bevctl.storage.labels import LabelStore
from bevctl.train.checkpoint import load_checkpoint


class _RunsCode:
    """Unpickling this calls ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_checkpoint(path: Path, marker: Path, how: str) -> Path:
    payload = {"model": {"w": torch.zeros(1)}, "config": {"model": "toy"}, "hook": _RunsCode(f"touch {marker}")}
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _other_preset(src: Path, dst: Path) -> Path:
    """The toy run's weights under a config that says it is the demo BEVFormer."""
    ckpt = load_checkpoint(src)
    ckpt["config"]["model"] = "demo"
    torch.save(ckpt, dst)
    return dst


def _uses(command: str, ckpt: Path, root: Path, version: str, tmp: Path) -> tuple[list[object], Path]:
    data = ["--dataroot", root, "--version", version]
    if command == "evaluate":
        out = tmp / "eval.json"
        return ["evaluate", "--checkpoint", ckpt, *data, "--device", "cpu", "--workers", "0", "--out", out], out
    if command == "visualize":
        out = tmp / "vis"
        return ["visualize", "--checkpoint", ckpt, "--sample", "x", *data, "--device", "cpu", "--out", out], out
    if command == "finetune-init":
        out = tmp / "run"
        return ["finetune", *data, "--init", ckpt, "--device", "cpu", "--workers", "0", "--max-steps", "1",
                "--out", out], out
    if command == "finetune-init-config":  # an explicit config: the weights must fit it
        out = tmp / "run"
        return ["finetune", *data, "--init", ckpt, "--config", "demo", "--device", "cpu", "--workers", "0",
                "--max-steps", "1", "--out", out], out
    raise ValueError(command)


CHECKPOINT_USES = ["evaluate", "visualize", "finetune-init"]


@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
@pytest.mark.parametrize("command", CHECKPOINT_USES)
def test_crafted_pickle_checkpoint_never_runs(command, how, tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker, how)
    args, out = _uses(command, evil, root, version, tmp_path)
    bevctl_cli(*args).assert_refused(evil, "not a readable bevctl checkpoint")
    assert not marker.exists(), "the crafted checkpoint ran code on load"
    assert not out.exists()


def test_crafted_last_pt_on_resume_never_runs(tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    evil = _evil_checkpoint(run / "last.pt", marker, "torch.save")
    res = bevctl_cli("finetune", "--dataroot", root, "--version", version, "--config", "toy", "--device", "cpu",
                     "--workers", "0", "--max-steps", "1", "--resume", "--out", run)
    res.assert_refused(evil, "not a readable bevctl checkpoint")
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("command", CHECKPOINT_USES)
def test_truncated_checkpoint(command, tiny_synth, toy_checkpoint, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    bad = _truncated(toy_checkpoint, tmp_path / "ckpt" / "torn.pt")
    args, out = _uses(command, bad, root, version, tmp_path)
    bevctl_cli(*args).assert_refused(bad, "not a readable bevctl checkpoint")
    assert not out.exists()


def test_not_a_bevctl_checkpoint(tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    plain = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    args, out = _uses("evaluate", plain, root, version, tmp_path)
    bevctl_cli(*args).assert_refused(plain, "not a bevctl checkpoint")
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "visualize", "finetune-init-config"])
def test_checkpoint_of_another_preset(command, tiny_synth, toy_checkpoint, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    ckpt = toy_checkpoint if command == "finetune-init-config" else _other_preset(toy_checkpoint, tmp_path / "o.pt")
    args, out = _uses(command, ckpt, root, version, tmp_path)
    bevctl_cli(*args).assert_refused(ckpt, "do not fit")
    # evaluate/visualize write nothing; finetune may have recorded its scene choice, never a checkpoint
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["scenes.json"]


# ---- Hugging Face model directories ----------------------------------------------------------


def _remote_code_dir(tmp_path: Path, marker: Path) -> Path:
    """The shipped labeler's files, with a config asking for remote code that would create
    ``marker`` when imported."""
    from bevctl.pseudolabel.labeler import shipped_labeler_dir

    model = tmp_path / "remote-code-model"
    shutil.copytree(shipped_labeler_dir(), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return model


def test_pseudolabel_refuses_remote_code_model(tiny_synth, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    marker = tmp_path / "pwned"
    model = _remote_code_dir(tmp_path, marker)
    out = tmp_path / "labels.zarr"
    res = bevctl_cli("pseudolabel", "--dataroot", root, "--version", version, "--model", model, "--workers", "0",
                     "--out", out)
    res.assert_refused(model / "config.json", "remote code")
    assert not marker.exists() and not out.exists()


def test_train_labeler_refuses_remote_code_init(bevctl_cli, tmp_path) -> None:
    marker = tmp_path / "pwned"
    model = _remote_code_dir(tmp_path, marker)
    out = tmp_path / "labeler"
    res = bevctl_cli("train-labeler", "--out", out, "--work", tmp_path / "work", "--init", model, "--steps", "1")
    res.assert_refused(model / "config.json", "remote code")
    assert not marker.exists() and not out.exists()
    assert not (tmp_path / "work").exists()  # refused before generating any training data


def test_crafted_pickle_in_a_real_process(tiny_synth, tmp_path) -> None:
    """The same refusal through the installed entry point in its own process (real stderr)."""
    root, version = tiny_synth
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker, "torch.save")
    env = dict(os.environ, BEVCTL_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bevctl.cli", "evaluate", "--checkpoint", str(evil), "--dataroot",
                           str(root), "--version", version, "--device", "cpu", "--out", str(tmp_path / "e.json")],
                          capture_output=True, text=True, timeout=300, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and str(evil) in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not marker.exists() and not (tmp_path / "e.json").exists()


# ---- the pseudo-label job's Ray cluster -------------------------------------------------------

INTRUDER = Path(__file__).with_name("ray_intruder.py")


def _gcs_port(ray_tmp: Path) -> int | None:
    """The GCS port of the one Ray session under ``ray_tmp`` (the job's private temp dir)."""
    files = list(ray_tmp.glob("bevray-*/session_latest/gcs_server_port_*"))
    text = files[0].read_text().strip() if files else ""
    return int(text) if text.isdigit() else None


def _stranger_env(home: Path, **extra: str) -> dict[str, str]:
    """Another user's shell, as far as Ray can tell: its own HOME and temp dir, no Ray token or
    setting inherited from this process; Ray gives up on a refused connection after ~3 s."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(home),
            "RAY_gcs_server_port_wait_time_s": "3", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.parametrize("auth", ["token", pytest.param("disabled-control", marks=pytest.mark.slow)])
def test_pseudolabel_ray_cluster_refuses_a_stranger(auth, fault_world, ref_labels, tmp_path) -> None:
    """While ``bevctl pseudolabel --workers 1`` runs its local Ray cluster, a process with another
    HOME and no token connects to the job's GCS at this machine's network address and tries to
    run a task there. With the default (token authentication) it is refused and the job finishes
    with the same store as an uninterrupted run; ``bevctl pseudolabel --address`` with a wrong
    token fails with one error line. The control (slow: it only shows that the test can fail)
    runs the job with authentication turned off: the stranger's task runs."""
    w = fault_world
    out = tmp_path / "labels.zarr"
    ray_tmp = Path(tempfile.mkdtemp(prefix="bvs", dir="/tmp"))  # short: Ray's unix sockets live below it
    extra = {"TMPDIR": str(ray_tmp)}
    if auth == "disabled-control":
        extra["RAY_AUTH_MODE"] = "disabled"  # NEGATIVE CONTROL ONLY: proves the stranger gets in without auth
    env = w.env(**extra)
    # synth-gt at 0.2 s per batch of 2 images: ~5 s of labelling, the driver held meanwhile
    args = w.pseudolabel(out, workers=1, model="synth-gt:0.2")
    host = ray.util.get_node_ip_address()  # this machine's own address, as Ray advertises it
    marker = tmp_path / "stranger-was-here"
    with (tmp_path / "job.out").open("w") as job_out, (tmp_path / "job.err").open("w") as job_err:
        job = subprocess.Popen(bevctl_cmd(*args), env=env, stdout=job_out, stderr=job_err, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while job.poll() is None and time.monotonic() < deadline and (
                    count_chunk_files(out / "masks") < 1 or _gcs_port(ray_tmp) is None):
                time.sleep(0.05)
            assert job.poll() is None, "the job ended before its cluster could be probed"
            port = _gcs_port(ray_tmp)
            assert port is not None, "no GCS port file under the job's Ray temp dir"
            os.kill(job.pid, signal.SIGSTOP)  # hold the driver: the cluster keeps running meanwhile
            try:
                stranger = subprocess.run([sys.executable, str(INTRUDER), f"{host}:{port}", str(marker)],
                                          env=_stranger_env(tmp_path / "stranger"), capture_output=True,
                                          text=True, timeout=120)
                joiner = None
                if auth == "token":  # bevctl itself joining with a wrong token: one error line
                    joiner = subprocess.run(
                        bevctl_cmd(*w.pseudolabel(tmp_path / "joined.zarr", workers=1), "--address", f"{host}:{port}"),
                        env=_stranger_env(tmp_path / "joiner", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64,
                                          BEVCTL_CACHE_DIR=str(w.cache), PYTHONPATH=os.environ.get("PYTHONPATH", "")),
                        capture_output=True, text=True, timeout=180)
            finally:
                os.kill(job.pid, signal.SIGCONT)
            job.wait(timeout=240)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
            reap_group(job.pid)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    err = (tmp_path / "job.err").read_text()
    verdict = stranger.stdout.strip()
    if auth == "token":
        assert verdict.startswith("refused"), f"{verdict}\n{stranger.stderr[-2000:]}"
        assert not marker.exists(), "a process without the token ran code on the job's cluster"
        errors = [line for line in joiner.stderr.splitlines() if line.startswith("error:")]
        assert joiner.returncode == 2 and len(errors) == 1, joiner.stderr[-3000:]
        assert "refused" in errors[0] and "RAY_AUTH_TOKEN" in errors[0] and "RAY_AUTH_TOKEN_PATH" in errors[0]
        assert "Traceback" not in joiner.stderr and not (tmp_path / "joined.zarr").exists()
        assert "Ray token authentication: token file" in err  # the job says which token its cluster uses
    else:
        assert verdict == "ran" and marker.exists(), f"{verdict}\n{stranger.stderr[-2000:]}"
        assert "accepts code from anyone" in err  # bevctl warns when authentication is off
    assert job.returncode == 0, err[-3000:]
    a, b = store_files(ref_labels), store_files(out)  # same masks, confidence, done record, tokens
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    assert LabelStore.open(out).counts() == {"todo": 0, "done": 8, "failed": 0}
    assert not temp_leftovers(tmp_path)
