"""``bevctl pseudolabel --gpus 8`` without a GPU: a Ray cluster started with 8 logical GPUs (Ray's
resource accounting allows it on a CPU machine) and the ``device-probe`` stand-in labeler, which
records the device and the GPUs each actor was given. In-process labelling: the model on the GPU
in half precision when there is one."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bevctl.data.nuscenes import load_index
from bevctl.pseudolabel import job as job_mod
from bevctl.pseudolabel import labeler as labeler_mod
from bevctl.pseudolabel.job import PseudolabelConfig, run_pseudolabel
from bevctl.pseudolabel.ray_auth import prepare_local_cluster
from bevctl.pseudolabel.standins import SynthGTLabeler
from bevctl.storage.labels import open_mask_arrays


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow  # 8 Ray actor processes: ~1.5 min on the shared 2-core machine
def test_gpus_8_puts_one_actor_on_each_gpu_and_equals_the_in_process_run(
        tiny_synth, tmp_path, monkeypatch, run_bevctl, capsys) -> None:
    ray = pytest.importorskip("ray")
    root, version = tiny_synth
    monkeypatch.setenv("BEVCTL_CACHE_DIR", str(tmp_path / "cache"))
    log = tmp_path / "probe.jsonl"
    monkeypatch.setenv("BEVCTL_PROBE_LOG", str(log))  # before ray.init: the workers inherit it
    common = ["--dataroot", str(root), "--version", version, "--model", "device-probe", "--resolution", "45x80",
              "--batch-size", "2", "--confidence"]
    # the token bevctl's own local clusters use: Ray keeps the first token it loads for the life of
    # the process, so a later job of this test session must find the same one
    prepare_local_cluster()
    ray.init(num_cpus=2, num_gpus=8, include_dashboard=False, logging_level=logging.WARNING,
             _temp_dir=str(Path("/tmp") / f"bevray-gpus-{tmp_path.name[-12:]}"))
    try:
        assert run_bevctl("pseudolabel", *common, "--out", str(tmp_path / "ray.zarr"), "--gpus", "8") == 0
        capsys.readouterr()
        assert run_bevctl("pseudolabel", *common, "--out", str(tmp_path / "nine.zarr"), "--gpus", "9") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: --gpus 9: the Ray cluster has 8 GPUs"]
    finally:
        ray.shutdown()

    records = _records(log)
    loads = [r for r in records if r["event"] == "load"]
    assert len(loads) == 8 and len({r["pid"] for r in loads}) == 8  # 8 actors, each its own process
    assert sorted(r["cuda_visible_devices"] for r in loads) == [str(i) for i in range(8)]  # 8 distinct GPUs
    for r in loads:  # each actor's model on "its" cuda device: the one GPU Ray made visible to it
        assert r["device"] == "cuda" and r["ray_gpu_ids"] == [r["cuda_visible_devices"]]
    images = Counter(r["image"] for r in records if r["event"] == "image")
    index = load_index(root, version)
    want = {cam.image_path for s in index.all_samples() for cam in s.cameras}
    assert set(images) == want and set(images.values()) == {1}  # every image once
    assert len({r["pid"] for r in records if r["event"] == "image"}) == 8  # and every actor labelled some

    log.unlink()  # the same job in process, without Ray
    assert run_bevctl("pseudolabel", *common, "--out", str(tmp_path / "inline.zarr"), "--workers", "0") == 0
    inline = _records(log)
    assert {r["device"] for r in inline} == {"cuda" if torch.cuda.is_available() else "cpu"}
    for name in ("ray.zarr", "inline.zarr"):
        assert (tmp_path / name / "zarr.json").is_file()
    ray_masks, ray_conf = open_mask_arrays(str(tmp_path / "ray.zarr"), True)
    in_masks, in_conf = open_mask_arrays(str(tmp_path / "inline.zarr"), True)
    np.testing.assert_array_equal(ray_masks[:], in_masks[:])
    np.testing.assert_array_equal(ray_conf[:], in_conf[:])


def test_in_process_labeler_goes_on_the_gpu_in_half_precision(tiny_synth, tmp_path, monkeypatch) -> None:
    """`--workers 0` (the path a GPU machine without Ray takes) asks for device "auto", which the
    Mask2Former labeler resolves to CUDA in bf16 (fp16 where bf16 is missing)."""
    root, version = tiny_synth
    monkeypatch.setenv("BEVCTL_CACHE_DIR", str(tmp_path / "cache"))
    asked = []

    def fake_load(model: str, device: str = "auto", dtype: str = "auto"):
        asked.append((model, device, dtype))
        return SynthGTLabeler()

    monkeypatch.setattr(job_mod, "load_labeler", fake_load)  # the job's own reference
    summary = run_pseudolabel(PseudolabelConfig(dataroot=str(root), version=version, out=str(tmp_path / "l.zarr"),
                                                model="some/checkpoint", workers=0, progress=False))
    assert summary.samples_done == summary.samples_total
    assert asked == [("some/checkpoint", "auto", "auto")]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert labeler_mod._pick_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert labeler_mod._pick_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert labeler_mod._pick_dtype("auto", "cuda") == torch.float16
    assert labeler_mod._pick_dtype("auto", "cpu") == torch.float32


class _CountingLabeler(SynthGTLabeler):
    """synth-gt that counts how many images it is given at the same time; ``device`` is what the
    job reads (nothing touches a GPU)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        self.lock = threading.Lock()
        self.now = self.most = 0

    def preprocess_file(self, image, path):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.03)  # a JPEG decode
        with self.lock:
            self.now -= 1
        return super().preprocess_file(image, path)


@pytest.mark.parametrize("device,most", [("cpu", 3), ("cuda", 6)])
def test_in_process_decoding_widens_to_the_cores_when_the_model_is_on_a_gpu(
        tiny_synth, tmp_path, monkeypatch, device, most) -> None:
    root, version = tiny_synth
    monkeypatch.setenv("BEVCTL_CACHE_DIR", str(tmp_path / "cache"))
    lab = _CountingLabeler(device)
    monkeypatch.setattr(job_mod, "load_labeler", lambda model, device="auto", dtype="auto": lab)
    monkeypatch.setattr(job_mod, "_usable_cpus", lambda: 6)
    summary = run_pseudolabel(PseudolabelConfig(dataroot=str(root), version=version, out=str(tmp_path / "l.zarr"),
                                                model="x", workers=0, batch_size=1, progress=False))
    assert summary.samples_done == summary.samples_total and summary.labeler_device == device
    assert lab.most == most  # batches decoding at once: inflight (3), or one per usable core
