"""Stores and checkpoints on local disk vs on an S3-compatible server (moto, in this process).

For each target (a local directory, ``s3://`` on moto's standalone server on 127.0.0.1):

- ``pseudolabel``: ``run_pseudolabel`` in process (``workers=0``, the ``synth-gt`` oracle, so
  the labeler costs ~nothing and the store dominates) -> images/s, and the time spent in Zarr
  chunk writes;
- ``read labels``: a fresh ``LabelStore.open`` + ``get`` of every sample (what a training
  DataLoader worker does) -> samples/s;
- ``prepare-gt``: in process (``workers=0``) -> samples/s;
- ``checkpoint``: ``save_checkpoint`` + ``load_checkpoint`` of the ``demo`` preset's model and
  optimiser state -> seconds each, and the size.

moto is a Python server sharing this process's (busy) CPU cores: the S3 numbers show that the
paths work and what one request at a time through a slow endpoint costs, not what AWS S3 would
deliver (its per-request latency is ~10-30 ms, but it serves many requests in parallel). The
machine is shared: the load average is recorded.

Results: bench/results/object_storage.json and object_storage.md.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
VERSION = "v1.0-synth"
SCENES, SAMPLES_PER_SCENE, IMAGE_HW = 2, 10, (112, 200)
BUCKET = "bench"


def start_moto() -> object:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_EC2_METADATA_DISABLED="true")
    import fsspec

    fsspec.filesystem("s3").mkdir(BUCKET)
    return server


def run_case(name: str, base: str, dataroot: Path) -> dict:
    import torch

    from bevctl.config import class_set_from_name, grid_from_name
    from bevctl.pseudolabel.job import PseudolabelConfig, run_pseudolabel
    from bevctl.storage import location
    from bevctl.storage.gt_store import prepare_gt
    from bevctl.storage.labels import LabelStore
    from bevctl.train.checkpoint import load_checkpoint, save_checkpoint
    from bevctl.train.config import load_train_config
    from bevctl.train.build import build_model
    from bevctl.train.loop import make_optimizer

    labels = location.join(base, "labels.zarr")
    cfg = PseudolabelConfig(dataroot=str(dataroot), version=VERSION, out=labels, model="synth-gt", workers=0,
                            batch_size=6, progress=False)
    t0 = time.perf_counter()
    job = run_pseudolabel(cfg)
    label_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    store = LabelStore.open(labels)
    for token in store.tokens:
        store.get(token)
    read_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    gt = prepare_gt(dataroot, VERSION, grid_from_name("demo"), class_set_from_name("hdmapnet"),
                    location.join(base, "gt.zarr"), workers=0, progress=False)
    gt_s = time.perf_counter() - t0

    train_cfg = load_train_config("demo")
    model = build_model(train_cfg)
    opt = make_optimizer(model, train_cfg)
    for p in model.parameters():  # optimiser state of the size training has
        p.grad = torch.zeros_like(p)
    opt.step()
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": {}, "step": 1}
    run = location.join(base, "run")
    t0 = time.perf_counter()
    path = save_checkpoint(run, 1, payload)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_checkpoint(run)
    load_s = time.perf_counter() - t0
    return {
        "target": name,
        "samples": job.samples_total,
        "images": job.images_labeled,
        "pseudolabel_images_per_s": round(job.images_labeled / label_s, 1),
        "pseudolabel_write_s": round(job.write_s, 3),
        "store_bytes": location.du(labels),
        "read_labels_samples_per_s": round(len(store) / read_s, 1),
        "prepare_gt_samples_per_s": round(gt.total / gt_s, 1),
        "checkpoint_mb": round(len(location.read_bytes(path)) / 2**20, 1),
        "checkpoint_save_s": round(save_s, 3),
        "checkpoint_load_s": round(load_s, 3),
    }


def main() -> None:
    import importlib.util

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        print("bench_object_storage: needs the dev extra (moto[server], s3fs); skipped")
        return
    from bevctl.data.synth import SynthConfig, write_synthetic_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_object_storage_"))
    server = start_moto()
    try:
        dataroot = work / "synth"
        write_synthetic_dataset(SynthConfig(scenes=SCENES, samples_per_scene=SAMPLES_PER_SCENE, image_hw=IMAGE_HW,
                                            seed=0, version=VERSION, workers=1), dataroot, progress=False)
        os.environ["BEVCTL_CACHE_DIR"] = str(work / "cache")
        rows = [run_case("local disk", str(work / "local"), dataroot),
                run_case("s3:// (moto, 127.0.0.1)", f"s3://{BUCKET}/bench", dataroot)]
    finally:
        server.stop()  # type: ignore[attr-defined]
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "what": "stores and checkpoints on local disk vs an S3-compatible server (moto) in this process",
        "dataset": {"scenes": SCENES, "samples_per_scene": SAMPLES_PER_SCENE, "image_hw": list(IMAGE_HW)},
        "host": {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()},
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "object_storage.json").write_text(json.dumps(result, indent=2) + "\n")
    cols = ["target", "pseudolabel_images_per_s", "pseudolabel_write_s", "store_bytes", "read_labels_samples_per_s",
            "prepare_gt_samples_per_s", "checkpoint_mb", "checkpoint_save_s", "checkpoint_load_s"]
    lines = [f"Stores and checkpoints: local disk vs s3:// on moto (a Python server in the same process on "
             f"shared cores: not AWS's latency or throughput). {SCENES * SAMPLES_PER_SCENE} samples x 6 images {IMAGE_HW[0]}x{IMAGE_HW[1]}, "
             f"synth-gt labeler in process, demo-preset checkpoint; load average {result['host']['loadavg_1m']} on "
             f"{result['host']['cpus']} CPUs.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    (RESULTS / "object_storage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
