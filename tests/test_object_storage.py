"""Stores and runs on object storage, against a local S3-compatible server (moto) on 127.0.0.1.

The server runs in this process (``moto.server.ThreadedMotoServer``); bevctl reaches it the way
a user's setup would: credentials and endpoint from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``), URLs on the command line. End to end:
pseudolabel (interrupted, rerun) -> s3, prepare-gt -> s3, pretrain streaming from s3 with its run
directory and checkpoints on s3 (interrupted, resumed), fine-tune from an s3 checkpoint,
evaluate with the report written to s3; every result equals the same run on local disk.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from bevctl.errors import BevctlError  # noqa: E402
from bevctl.storage import location  # noqa: E402

BUCKET = "bevctl-test"
_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
        "AWS_EC2_METADATA_DISABLED")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> str:
    """``s3://bevctl-test``: a bucket on a moto server on 127.0.0.1, reached through the env."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    type(fs).clear_instance_cache()  # a filesystem cached by an earlier module points at its (stopped) server
    fs.makedirs(BUCKET, exist_ok=True)  # moto keeps its state per process: another module's server made it
    try:
        yield f"s3://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _objects(url: str) -> dict[str, bytes]:
    """Every object under ``url``: relative key -> bytes."""
    fs, path = location.remote(url)
    fs.invalidate_cache()
    return {key[len(path) + 1:]: fs.cat_file(key) for key in fs.find(path)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- the location module -------------------------------------------------------------------------


def test_paths_and_urls_join_and_classify() -> None:
    assert location.protocol("runs/a") is None and location.protocol("s3://b/k") == "s3"
    assert location.local_path("runs/a") == Path("runs/a")
    assert location.local_path("file:///tmp/x/y.zarr") == Path("/tmp/x/y.zarr")
    assert location.local_path("s3://b/k") is None and not location.is_local("gs://b/k")
    assert location.join("s3://b/runs/", "pre", "last.pt") == "s3://b/runs/pre/last.pt"
    assert location.join("runs", "pre", "last.pt") == str(Path("runs/pre/last.pt"))
    assert location.join("file:///tmp/r", "last.pt") == "file:///tmp/r/last.pt"
    assert location.with_suffix("s3://b/r/eval.json", ".md") == "s3://b/r/eval.md"
    assert location.with_suffix("out/eval.json", ".md") == str(Path("out/eval.md"))
    with pytest.raises(BevctlError, match="absolute path"):
        location.local_path("file://relative/x")


@pytest.mark.parametrize("kind", ["local", "file-url", "s3"])
def test_file_operations_on_every_kind_of_target(kind: str, tmp_path: Path, s3: str) -> None:
    base = {"local": str(tmp_path / "d"), "file-url": f"file://{tmp_path}/f", "s3": f"{s3}/ops-{kind}"}[kind]
    a, b = location.join(base, "sub", "a.txt"), location.join(base, "sub", "b.txt")
    assert not location.exists(a) and location.listdir(location.join(base, "sub")) == []
    location.write_text_atomic(a, "hello")
    location.write_bytes_atomic(a, b"hello world")  # replaces it whole
    assert location.read_bytes(a) == b"hello world" and location.is_file(a) and not location.is_file(base)
    assert location.is_dir(location.join(base, "sub"))
    location.copy_file(a, b)
    assert location.read_text(b) == "hello world"
    assert location.listdir(location.join(base, "sub")) == ["a.txt", "b.txt"]
    assert location.du(base) == 22
    location.remove(a)
    location.remove(a)  # nothing there: no error
    assert location.listdir(location.join(base, "sub")) == ["b.txt"]
    with pytest.raises(FileNotFoundError):
        location.read_bytes(a)
    location.remove_tree(base)
    assert not location.exists(b)
    from zarr.storage import FsspecStore, LocalStore

    store = location.zarr_store(location.join(base, "x.zarr"))
    assert isinstance(store, FsspecStore if kind == "s3" else LocalStore)
    if kind == "local":  # nothing bevctl wrote is left lying around (no temp files)
        assert not any(tmp_path.rglob("*.tmp"))


def test_bad_urls_are_one_clear_error(s3: str) -> None:
    with pytest.raises(BevctlError, match=r"xyz://a/b: unknown storage protocol 'xyz://'"):
        location.exists("xyz://a/b")
    with pytest.raises(BevctlError, match=r"bucket 'no-such-bucket' does not exist"):
        location.zarr_store("s3://no-such-bucket/labels.zarr")
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(BevctlError, match=r"gs://b/x: the 'gs://' protocol needs a package that is not installed"):
            location.check("gs://b/x")


def test_cli_without_credentials_or_with_a_missing_bucket_says_so_in_one_line(
        s3: str, tmp_path: Path, capsys, run_bevctl) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "from bevctl.cli import main; main()", "labels", "stats", f"{s3}/labels.zarr"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().startswith("error: s3://bevctl-test/labels.zarr: no credentials for s3://")
    assert len(res.stderr.strip().splitlines()) == 1 and "AWS_ACCESS_KEY_ID" in res.stderr
    assert run_bevctl("pseudolabel", "--dataroot", str(tmp_path), "--out", "s3://no-such-bucket/labels.zarr") == 2
    assert capsys.readouterr().err.strip() == (
        "error: s3://no-such-bucket/labels.zarr: bucket 'no-such-bucket' does not exist "
        "(or these credentials cannot see it)")


# ---- sample stores -------------------------------------------------------------------------------


def test_interrupted_store_creation_is_never_taken_for_a_store(s3: str, monkeypatch) -> None:
    from bevctl.storage import base
    from bevctl.storage.base import ArraySpec, SampleStore

    url = f"{s3}/half.zarr"
    spec = [ArraySpec("x", (3, 4), "uint8", (1, 4))]
    real_fill = base._fill

    def crash_after_arrays(group, tokens, arrays):
        real_fill(group, tokens, arrays)
        raise KeyboardInterrupt  # killed before the bevctl attributes were written

    monkeypatch.setattr(base, "_fill", crash_after_arrays)
    with pytest.raises(KeyboardInterrupt):
        SampleStore.create(url, "demo", {"a": 1}, ["t0", "t1", "t2"], spec)
    monkeypatch.setattr(base, "_fill", real_fill)
    assert location.exists(location.join(url, "x", "zarr.json"))  # the arrays are there ...
    with pytest.raises(BevctlError, match="incomplete store"):  # ... but it is no store
        SampleStore.open(url, "demo")
    store, created = SampleStore.open_or_create(url, "demo", {"a": 1}, ["t0", "t1", "t2"], spec)
    assert created and store.counts() == {"todo": 3, "done": 0, "failed": 0}
    store.mark([1], base.DONE)
    again, created = SampleStore.open_or_create(url, "demo", {"a": 1}, ["t0", "t1", "t2"], spec)
    assert not created and again.counts()["done"] == 1
    with pytest.raises(BevctlError, match="already exists"):
        SampleStore.create(url, "demo", {"a": 1}, ["t0"], [])
    # --overwrite of something that is not a store is refused rather than deleted
    location.write_text_atomic(f"{s3}/notastore/keep.txt", "mine")
    with pytest.raises(BevctlError, match="not a Zarr store; refusing"):
        SampleStore.create(f"{s3}/notastore", "demo", {}, ["t0"], [], overwrite=True)
    assert location.read_text(f"{s3}/notastore/keep.txt") == "mine"


# ---- end to end through the CLI ------------------------------------------------------------------


def test_pseudolabel_prepare_gt_pretrain_resume_finetune_evaluate_on_s3(
        tiny_synth, tmp_path: Path, s3: str, monkeypatch, capsys, run_bevctl) -> None:
    from bevctl.pseudolabel import job as job_mod
    from bevctl.storage.gt_store import GTStore
    from bevctl.storage.labels import LabelStore
    from bevctl.train.checkpoint import load_checkpoint
    from bevctl.train.config import load_train_config
    from bevctl.train.loop import RunSpec, train

    torch.set_num_threads(1)
    monkeypatch.setenv("BEVCTL_CACHE_DIR", str(tmp_path / "cache"))
    root, version = tiny_synth
    data = ["--dataroot", str(root), "--version", version]
    s3_labels, s3_gt, s3_runs = f"{s3}/e2e/labels.zarr", f"{s3}/e2e/gt.zarr", f"{s3}/e2e/runs"

    # -- pseudolabel: a local reference run, then an S3 run interrupted half-way and rerun
    label_opts = [*data, "--workers", "0", "--model", "synth-gt", "--batch-size", "6", "--resolution", "45x80"]
    assert run_bevctl("pseudolabel", *label_opts, "--out", str(tmp_path / "labels.zarr")) == 0
    calls: list[list[tuple[int, int]]] = []
    real_label = job_mod.LabelWorker.label

    def label(self, store_path, confidence, hw, items):
        if interrupt_after is not None and len(calls) == interrupt_after:
            raise KeyboardInterrupt  # Ctrl-C while this batch is in flight
        calls.append([(i, c) for i, c, _ in items])
        return real_label(self, store_path, confidence, hw, items)

    monkeypatch.setattr(job_mod.LabelWorker, "label", label)
    interrupt_after: int | None = 5  # batches of 6 images = one sample each
    assert run_bevctl("pseudolabel", *label_opts, "--out", s3_labels) == 130
    first = LabelStore.open(s3_labels)
    done_first = set(np.flatnonzero(first.statuses() == 1).tolist())
    n = len(first)
    # done = reported back before the interrupt; the batches still in flight are simply redone
    assert done_first <= {i for batch in calls for i, _ in batch} and 1 <= len(done_first) < n
    interrupt_after, calls = None, []
    assert run_bevctl("pseudolabel", *label_opts, "--out", s3_labels) == 0
    assert f"{len(done_first)} skipped" in capsys.readouterr().out
    relabeled = sorted(ic for batch in calls for ic in batch)
    assert relabeled == [(i, c) for i in range(n) if i not in done_first for c in range(6)]  # exactly once
    ref, got = LabelStore.open(tmp_path / "labels.zarr"), LabelStore.open(s3_labels)
    assert got.counts() == {"todo": 0, "done": n, "failed": 0} and got.tokens == ref.tokens
    for token in ref.tokens:
        np.testing.assert_array_equal(got.get(token), ref.get(token))
    local_masks, s3_masks = _files(tmp_path / "labels.zarr" / "masks"), _objects(f"{s3_labels}/masks")
    assert s3_masks.keys() == local_masks.keys() and all(s3_masks[k] == local_masks[k] for k in local_masks)
    assert _objects(f"{s3_labels}/done")["c/0"] == (tmp_path / "labels.zarr" / "done" / "c" / "0").read_bytes()
    assert run_bevctl("labels", "stats", s3_labels, "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"]["done"] == n and stats["mask_bytes_on_disk"] == sum(map(len, s3_masks.values()))

    # -- prepare-gt: on S3 equals on disk
    gt_opts = [*data, "--grid", "demo", "--classes", "hdmapnet", "--workers", "0"]
    assert run_bevctl("prepare-gt", *gt_opts, "--out", str(tmp_path / "gt.zarr")) == 0
    assert run_bevctl("prepare-gt", *gt_opts, "--out", s3_gt) == 0
    gt_ref, gt_s3 = GTStore.open(tmp_path / "gt.zarr"), GTStore.open(s3_gt)
    assert gt_s3.done_tokens == gt_ref.done_tokens == gt_ref.tokens
    assert all(np.array_equal(gt_s3.get(t), gt_ref.get(t)) for t in gt_ref.tokens)

    # -- pretrain streaming from S3 into an S3 run directory; interrupted + resumed == uninterrupted
    train_opts = [*data, "--config", "toy", "--device", "cpu", "--max-steps", "4", "--checkpoint-every", "2",
                  "--batch-size", "1"]
    assert run_bevctl("pretrain", *train_opts, "--workers", "0", "--labels", str(tmp_path / "labels.zarr"),
                "--out", str(tmp_path / "pre")) == 0
    assert run_bevctl("pretrain", *train_opts, "--workers", "1", "--labels", s3_labels, "--out", f"{s3_runs}/pre") == 0
    cfg = load_train_config("toy", max_steps=4, checkpoint_every=2, batch_size=1, num_workers=0)
    cut = f"{s3_runs}/cut"
    train(RunSpec(mode="pretrain", cfg=cfg, run_dir=cut, dataroot=str(root), version=version, labels=s3_labels,
                  device="cpu", progress=False, stop_after_step=3))  # what the CLI runs, stopped after step 3
    assert load_checkpoint(cut)["step"] == 2
    assert run_bevctl("pretrain", *train_opts, "--workers", "0", "--labels", s3_labels, "--out", cut) == 2
    assert "--resume" in capsys.readouterr().err
    assert run_bevctl("pretrain", *train_opts, "--workers", "0", "--labels", s3_labels, "--out", cut, "--resume") == 0
    local_w = load_checkpoint(tmp_path / "pre")["model"]
    for run in (f"{s3_runs}/pre", cut):
        ck = load_checkpoint(run)
        assert ck["step"] == 4 and ck["run"]["labels"] == s3_labels
        assert ck["model"].keys() == local_w.keys() and all(torch.equal(ck["model"][k], local_w[k]) for k in local_w)
    files = _objects(cut)
    assert {"config.yaml", "run.json", "scenes.json", "metrics.jsonl", "last.pt", "checkpoints/step_0000004.pt"} <= set(files)
    assert files["last.pt"] == files["checkpoints/step_0000004.pt"]
    steps = [json.loads(line)["step"] for line in files["metrics.jsonl"].decode().splitlines()]
    assert steps == [1, 2, 3, 4]  # nothing lost or duplicated by the resume
    assert not any("AWS" in v.decode(errors="ignore") and "testing" in v.decode(errors="ignore")
                   for k, v in files.items() if not k.endswith(".pt"))  # the URL is recorded, never a secret

    # -- fine-tune from the S3 checkpoint on the S3 GT cache, evaluate with the report on S3
    assert run_bevctl("finetune", *data, "--device", "cpu", "--workers", "0", "--max-steps", "2", "--batch-size", "1",
                "--gt", s3_gt, "--init", f"{cut}/last.pt", "--fraction", "0.5", "--out", f"{s3_runs}/fin") == 0
    assert json.loads(location.read_text(f"{s3_runs}/fin/scenes.json"))["fraction"] == 0.5
    eval_opts = [*data, "--split", "val", "--device", "cpu", "--workers", "0"]
    assert run_bevctl("evaluate", "--checkpoint", f"{s3_runs}/fin", *eval_opts, "--gt", s3_gt,
                "--out", f"{s3}/e2e/eval.json") == 0
    assert run_bevctl("evaluate", "--checkpoint", f"{s3_runs}/fin", *eval_opts, "--gt", str(tmp_path / "gt.zarr"),
                "--out", str(tmp_path / "eval.json")) == 0
    on_s3 = json.loads(location.read_text(f"{s3}/e2e/eval.json"))
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_s3["confusion"] == on_disk["confusion"] and on_s3["num_samples"] > 0
    assert "mIoU" in location.read_text(f"{s3}/e2e/eval.md")
    capsys.readouterr()
    assert run_bevctl("evaluate", "--checkpoint", f"{s3_runs}/nope", *eval_opts) == 2
    assert capsys.readouterr().err.strip() == "error: checkpoint not found: s3://bevctl-test/e2e/runs/nope"


@pytest.mark.slow
def test_kill_9_of_a_ray_job_writing_to_s3_then_rerun_is_byte_identical(
        tiny_synth, tmp_path: Path, s3: str, run_bevctl) -> None:
    """Separate processes on S3: Ray labeler actors (credentials from the inherited env) write the
    chunks, the driver is killed with SIGKILL mid-way, the rerun completes the store; and
    prepare-gt's spawned worker processes write the GT cache."""
    import signal
    import time

    from bevctl.storage.gt_store import GTStore
    from bevctl.storage.labels import LabelStore

    root, version = tiny_synth
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BEVCTL_CACHE_DIR": str(tmp_path / "cache")}
    bevctl = [sys.executable, "-c", "from bevctl.cli import main; main()"]
    opts = ["--dataroot", str(root), "--version", version, "--workers", "2", "--batch-size", "3", "--model",
            "synth-gt:1.0"]  # 1 s per batch (a whole sample): the kill lands mid-job
    url = f"{s3}/killed/labels.zarr"
    ref = tmp_path / "ref.zarr"
    assert run_bevctl("pseudolabel", *opts[:4], "--workers", "0", "--batch-size", "3", "--model", "synth-gt",
                "--out", str(ref)) == 0
    n = len(LabelStore.open(ref))

    def done() -> int:
        try:
            return LabelStore.open(url).counts()["done"]
        except BevctlError:
            return 0

    proc = subprocess.Popen([*bevctl, "pseudolabel", *opts, "--out", url], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and done() < 1:
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(2)
    try:  # Ray's processes can outlive a killed driver: end what this test started
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    partial = done()
    assert 1 <= partial < n
    res = subprocess.run([*bevctl, "pseudolabel", *opts, "--out", url], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{partial} skipped" in res.stdout
    assert LabelStore.open(url).counts() == {"todo": 0, "done": n, "failed": 0}
    local_masks, s3_masks = _files(ref / "masks"), _objects(f"{url}/masks")
    assert s3_masks.keys() == local_masks.keys() and all(s3_masks[k] == local_masks[k] for k in local_masks)

    gt_url = f"{s3}/killed/gt.zarr"
    res = subprocess.run([*bevctl, "prepare-gt", "--dataroot", str(root), "--version", version, "--grid", "demo",
                          "--classes", "hdmapnet", "--workers", "2", "--out", gt_url], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    gt = GTStore.open(gt_url)
    assert gt.done_tokens == gt.tokens and len(gt) == n


def test_verify_and_repair_a_label_store_on_s3(s3: str) -> None:
    from bevctl.storage.labels import DONE, LabelStore, LabelStoreSpec, open_mask_arrays
    from bevctl.storage.verify import format_report, verify_store

    url = f"{s3}/verify/labels.zarr"
    spec = LabelStoreSpec(model_id="m", weights_hash="h", id2label={0: "road", 1: "lane"}, resolution=(8, 12),
                          dataset_version="v", splits=("train",), tokens=("t0", "t1", "t2"), confidence=True)
    store, _ = LabelStore.open_for_writing(url, spec, "/data")
    masks, conf = open_mask_arrays(url, confidence=True)
    for i in range(3):
        masks[i] = np.full((6, 8, 12), i % 2, np.uint8)
        conf[i] = np.zeros((6, 8, 12), np.uint8)  # equal to its fill value: still written
    store.mark([0, 1, 2], DONE)
    store.consolidate()
    report = verify_store(url, workers=4, progress=False)
    assert report.ok and report.chunks_checked == 3 * 2, format_report(report)  # one object per sample and array

    fs, path = location.remote(url)
    fs.rm_file(f"{path}/masks/c/1/0/0/0")
    fs.pipe_file(f"{path}/confidence/c/2/0/0/0", b"\0" * 16)
    report = verify_store(url, workers=4, repair=True, progress=False)
    assert sorted(report.damaged) == ["t1", "t2"], format_report(report)
    assert "masks: chunk c/1/0/0/0 missing" in report.damaged["t1"][0]
    assert "confidence: chunk c/2/0/0/0 corrupt" in report.damaged["t2"][0]
    assert LabelStore.open(url).statuses().tolist() == [DONE, 0, 0]
