"""Multi-node, simulated on one machine.

Ray: a cluster of a head (no CPUs: no actor lands there) and two worker nodes, each a separate
raylet with its own resources (``ray.cluster_utils.Cluster``). ``bevctl pseudolabel --address``
must spread its labeler actors over both workers, write the same store as a single-process run,
and survive losing a worker node mid-job (its work is redone elsewhere, nothing is lost or
counted twice).

DDP: two ``torchrun --nnodes 2 --nproc-per-node 1`` launchers (two "nodes") with a c10d
rendezvous on 127.0.0.1 (as ``examples/slurm/common.sh`` runs them) run ``bevctl pretrain`` with gloo and must give the same weights as one
process on the combined batch. This holds for BatchNorm-free models (the toy stand-in): the
BEVFormer's BatchNorm is per-process, not SyncBN, so its statistics differ with the split.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from ray._raylet import Config as RayConfig  # Ray's own tests reload it the same way

from bevctl.errors import BevctlError
from bevctl.pseudolabel import ray_auth
from bevctl.pseudolabel.job import PseudolabelConfig, run_pseudolabel
from bevctl.storage.labels import LabelStore
from bevctl.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # each test starts a Ray cluster or torchrun processes (seconds)

VENV_BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


class SimCluster:
    """A head node without CPUs and two 1-CPU worker nodes, all on this machine."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        self.workers = [self.cluster.add_node(num_cpus=1, resources={f"worker{i}": 1}) for i in (1, 2)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def worker_ids(self) -> set[str]:
        return {node.node_id for node in self.workers}

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture
def sim_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimCluster]:
    # A private Ray temp dir (short: Ray puts unix sockets there): other Ray sessions on this
    # machine neither see this cluster nor get their "current cluster" file overwritten.
    tmp = Path(tempfile.mkdtemp(prefix="bvc", dir="/tmp"))
    (tmp / "ray").mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    # Token authentication as on a real cluster: every node (started from this process) and the
    # bevctl driver (a subprocess) inherit RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, this
    # process's private token (Ray keeps the token it first loaded for the life of a process).
    # Ray read its config when it was imported: reload it so this process is in token mode too.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    ray_auth.prepare_local_cluster()
    RayConfig.initialize("")
    cluster = None
    try:
        cluster = SimCluster()
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _pseudolabel_cli(root: Path, version: str, out: Path, address: str, model: str, batch_size: int) -> list[str]:
    return [str(VENV_BIN / "bevctl"), "pseudolabel", "--dataroot", str(root), "--version", version, "--out", str(out),
            "--model", model, "--workers", "2", "--batch-size", str(batch_size), "--address", address]


def _reference_store(root: Path, version: str, out: Path) -> Path:
    """The same labels from one process without Ray."""
    run_pseudolabel(PseudolabelConfig(dataroot=str(root), version=version, out=str(out), model="synth-gt",
                                      workers=0, batch_size=3, progress=False))
    return out


def _assert_same_store(ref: Path, out: Path) -> None:
    a, b = LabelStore.open(ref), LabelStore.open(out)
    assert b.counts() == {"todo": 0, "done": len(a), "failed": 0}
    for token in a.tokens:
        np.testing.assert_array_equal(a.get(token), b.get(token), err_msg=token)
    chunks_a = {p.relative_to(ref): p.read_bytes() for p in (ref / "masks").rglob("*") if p.is_file()}
    chunks_b = {p.relative_to(out): p.read_bytes() for p in (out / "masks").rglob("*") if p.is_file()}
    assert chunks_a == chunks_b  # whole chunks, byte for byte


def _done_count(out: Path) -> int:
    try:
        return LabelStore.open(out).counts()["done"]
    except BevctlError:  # not created yet
        return 0


def test_pseudolabel_on_a_cluster_spreads_actors_over_both_worker_nodes(sim_cluster, tiny_synth, tmp_path) -> None:
    root, version = tiny_synth
    ref = _reference_store(root, version, tmp_path / "ref.zarr")
    out = tmp_path / "cluster.zarr"
    res = subprocess.run(_pseudolabel_cli(root, version, out, sim_cluster.address, "synth-gt:0.05", 3),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = LabelStore.open(out).run_info["last_summary"]
    n_images = 6 * len(LabelStore.open(ref))
    assert summary["images_labeled"] == n_images and summary["actor_restarts"] == 0
    per_node = summary["images_per_node"]
    assert set(per_node) == sim_cluster.worker_ids()  # both workers labeled, the head did not
    assert all(n > 0 for n in per_node.values()) and sum(per_node.values()) == n_images
    assert "ray nodes    2 labeled images" in res.stdout
    _assert_same_store(ref, out)


def test_losing_a_worker_node_mid_job_loses_no_sample(sim_cluster, tiny_synth, tmp_path) -> None:
    root, version = tiny_synth
    ref = _reference_store(root, version, tmp_path / "ref.zarr")
    n_samples = len(LabelStore.open(ref))
    out = tmp_path / "cluster.zarr"
    # 1 s per batch (batches hold whole samples: 6 images): one batch per sample over two actors,
    # several seconds of work, so the removed node's actor still has batches in flight
    proc = subprocess.Popen(_pseudolabel_cli(root, version, out, sim_cluster.address, "synth-gt:1.0", 2),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and _done_count(out) < 1:
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before a node could be removed"
        done_before = _done_count(out)
        # The lost node's actor cannot come back: the other node's CPU is taken by its own actor
        # (like a GPU cluster running one actor per GPU). Its batches must go to the survivor.
        sim_cluster.cluster.remove_node(sim_cluster.workers[1], allow_graceful=False)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert done_before < n_samples
    summary = LabelStore.open(out).run_info["last_summary"]
    assert summary["actor_restarts"] >= 1 and "died" in stderr
    # every image reported written exactly once (a batch lost with the node is redone, not
    # counted twice), every sample DONE once, and the masks are those of the reference
    assert summary["images_labeled"] == 6 * n_samples
    assert summary["samples_done"] == n_samples and summary["samples_failed"] == 0
    assert set(summary["images_per_node"]) <= sim_cluster.worker_ids()
    assert summary["images_per_node"].get(sim_cluster.workers[0].node_id, 0) > 0
    _assert_same_store(ref, out)


# ---- DDP across two (simulated) nodes --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_match_one_process_on_the_combined_batch(tiny_synth, tmp_path) -> None:
    root, version = tiny_synth
    labels = tmp_path / "labels.zarr"
    run_pseudolabel(PseudolabelConfig(dataroot=str(root), version=version, out=str(labels), model="synth-gt",
                                      workers=0, resolution=(45, 80), progress=False))
    common = ["pretrain", "--dataroot", str(root), "--version", version, "--labels", str(labels), "--config", "toy",
              "--device", "cpu", "--workers", "0", "--max-steps", "3", "--epochs", "10", "--checkpoint-every", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run([str(VENV_BIN / "bevctl"), *common, "--batch-size", "2", "--out", str(one)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    # two launchers ("nodes"), one process each, c10d rendezvous as in examples/slurm/common.sh
    endpoint = f"127.0.0.1:{_free_port()}"
    launcher = [str(VENV_BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", endpoint, "--rdzv-id", "bevctl-sim"]
    nodes = [subprocess.Popen([*launcher, str(VENV_BIN / "bevctl"), *common, "--batch-size", "1", "--out", str(two)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_, err) in zip(nodes, outputs):
        assert p.returncode == 0, err[-3000:]

    a, b = load_checkpoint(one / "last.pt"), load_checkpoint(two / "last.pt")
    assert a["step"] == b["step"] == 3
    assert a["run"]["world"] == 1 and b["run"]["world"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k, wa in a["model"].items():
        assert torch.allclose(wa, b["model"][k], rtol=1e-4, atol=1e-6), k
    # the optimiser really stepped on non-zero gradients (the weights are not both still the init)
    moments = [st["exp_avg"] for st in a["optimizer"]["state"].values() if "exp_avg" in st]
    assert moments and any(float(m.abs().sum()) > 0 for m in moments)


def test_equality_needs_a_batchnorm_free_model() -> None:
    """Why the DDP test uses the toy model: the BEVFormer normalises per process (BatchNorm, not
    SyncBN), so split batches see different statistics; the toy model has no BatchNorm."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from bevctl.train.config import load_train_config
    from bevctl.train.build import build_model

    def has_bn(preset: str) -> bool:
        return any(isinstance(m, _BatchNorm) for m in build_model(load_train_config(preset)).modules())

    assert not has_bn("toy")
    assert has_bn("demo")
