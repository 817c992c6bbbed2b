"""Label-store layouts: objects per sample, write/read samples/s, requests, bytes.

Full nuScenes is 34,149 samples x 6 cameras: one chunk per (sample, camera) (today's layout)
is ~205k objects. Candidates that put a sample's six cameras in one object:

- ``chunk/camera`` (today): chunks (1, 1, H, W), one object per camera image;
- ``shard/sample``: Zarr sharding, one shard (1, 6, H, W) per sample holding six inner chunks
  (1, 1, H, W) and an index; a single camera still reads alone (byte-range GETs);
- ``chunk/sample``: chunks (1, 6, H, W), one object per sample.

Every layout writes whole samples (``masks[i] = (6, H, W)``: what a sample-aligned writer
does) with the masks' codec (zstd-15 + checksum, fill 255), then reads every sample back, on
local disk and on a local S3-compatible server (moto, in this process, 127.0.0.1). Requests
are counted at the server (by method; GET with a ``list-type`` query = LIST). Masks: the
synthetic world's image GT (class ids) at 225x400, 48 distinct masks cycled over the samples.

Results: bench/results/store_layout.json and store_layout.md. A shared, loaded 2-core box: the
rates are rough; objects, requests and bytes are exact.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SAMPLES = int(os.environ.get("BENCH_LAYOUT_SAMPLES", "60"))
IMAGE_HW = (225, 400)
NUSCENES_SAMPLES = 34149
REQUESTS: collections.Counter = collections.Counter()


def masks_from_world(work: Path) -> np.ndarray:
    """uint8 (48, H, W): the synthetic world's class-id images."""
    from PIL import Image

    from bevctl.data.synth import SynthConfig, write_synthetic_dataset

    root = work / "data"
    write_synthetic_dataset(SynthConfig(scenes=2, samples_per_scene=4, image_hw=IMAGE_HW, seed=5, workers=1), root,
                            overwrite=True, progress=False)
    pngs = sorted((root / "semantic").rglob("*.png"))
    return np.stack([np.asarray(Image.open(p)) for p in pngs]).astype(np.uint8)


def start_moto() -> tuple[object, str]:
    """A moto server on 127.0.0.1 that counts requests into REQUESTS; returns (server, endpoint)."""
    import moto.moto_server.threaded_moto_server as tms

    base = tms.DomainDispatcherApplication

    class Counting(base):  # type: ignore[misc, valid-type]
        def __call__(self, environ, start_response):
            method = environ["REQUEST_METHOD"]
            if method == "GET" and "list-type" in environ.get("QUERY_STRING", ""):
                method = "LIST"
            REQUESTS[method] += 1
            return super().__call__(environ, start_response)

    tms.DomainDispatcherApplication = Counting
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = tms.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=endpoint,
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
    return server, endpoint


LAYOUTS = {"chunk/camera (today)": ("chunks", None), "shard/sample": ("shards", None),
           "chunk/sample": ("sample", None)}


def run_layout(name: str, url: str, masks: np.ndarray) -> dict:
    import zarr

    from bevctl.storage import location
    from bevctl.storage.codecs import IGNORE, WRITE_CONFIG, mask_compressors

    h, w = IMAGE_HW
    kind = LAYOUTS[name][0]
    chunks = (1, 6, h, w) if kind == "sample" else (1, 1, h, w)
    shards = (1, 6, h, w) if kind == "shards" else None
    store = location.zarr_store(url)
    arr = zarr.create_array(store, shape=(SAMPLES, 6, h, w), chunks=chunks, shards=shards, dtype="uint8",
                            fill_value=IGNORE, compressors=mask_compressors(), zarr_format=3).with_config(WRITE_CONFIG)
    frames = [masks[np.arange(6 * i, 6 * i + 6) % len(masks)] for i in range(SAMPLES)]
    REQUESTS.clear()
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        arr[i] = f
    write_s = time.perf_counter() - t0
    writes = dict(REQUESTS)
    reader = zarr.open_array(location.zarr_store(url, read_only=True), mode="r", zarr_format=3)
    REQUESTS.clear()
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        assert np.array_equal(reader[i], f)
    read_s = time.perf_counter() - t0
    reads = dict(REQUESTS)
    REQUESTS.clear()
    t0 = time.perf_counter()
    for i, f in enumerate(frames):  # one camera alone (e.g. labels show, a per-camera reader)
        assert np.array_equal(reader[i, 3], f[3])
    cam_s = time.perf_counter() - t0
    cam_reads = dict(REQUESTS)
    fs_objects = _objects(url)
    return {"layout": name, "objects": fs_objects[0], "objects_per_sample": round(fs_objects[0] / SAMPLES, 2),
            "bytes_per_sample": round(fs_objects[1] / SAMPLES, 1),
            "write_samples_per_s": round(SAMPLES / write_s, 1), "read_samples_per_s": round(SAMPLES / read_s, 1),
            "read_one_camera_per_s": round(SAMPLES / cam_s, 1),
            "write_requests": writes, "read_requests": reads, "read_one_camera_requests": cam_reads,
            "nuscenes_objects": int(round(fs_objects[0] / SAMPLES * NUSCENES_SAMPLES))}


def _objects(url: str) -> tuple[int, int]:
    """(chunk objects, their bytes) under ``url/c``."""
    from bevctl.storage import location

    local = location.local_path(url)
    if local is not None:
        files = [p for p in (local / "c").rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)
    fs, path = location.remote(url)
    fs.invalidate_cache()
    sizes = fs.find(f"{path}/c", detail=True)
    return len(sizes), sum(int(v["size"]) for v in sizes.values())


def to_markdown(res: dict) -> str:
    lines = [f"{res['samples']} samples x 6 cameras of 225x400 class-id masks (zstd-15 + checksum), whole-sample "
             f"writes; {res['machine']}, shared and loaded: rates are rough, objects/requests/bytes exact.", "",
             "| where | layout | objects/sample | full nuScenes objects | bytes/sample | write samples/s | "
             "read samples/s | read 1 camera/s | write requests | read requests (whole sample) | "
             "read requests (1 camera) |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for where, rows in res["results"].items():
        for r in rows:
            def req(d: dict) -> str:
                return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"

            lines.append(f"| {where} | {r['layout']} | {r['objects_per_sample']} | {r['nuscenes_objects']:,} | "
                         f"{r['bytes_per_sample']} | {r['write_samples_per_s']} | {r['read_samples_per_s']} | "
                         f"{r['read_one_camera_per_s']} | {req(r['write_requests'])} | {req(r['read_requests'])} | "
                         f"{req(r['read_one_camera_requests'])} |")
    return "\n".join(lines)


def main() -> None:
    res = {"machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "samples": SAMPLES, "results": {}}
    with tempfile.TemporaryDirectory(prefix="bench-layout-") as tmp:
        work = Path(tmp)
        masks = masks_from_world(work)
        server, _ = start_moto()
        try:
            for where in ("local disk", "S3 (moto, loopback)"):
                rows = []
                for k, name in enumerate(LAYOUTS):
                    url = str(work / f"l{k}.zarr") if where == "local disk" else f"s3://bench/l{k}.zarr"
                    rows.append(run_layout(name, url, masks))
                    print(where, json.dumps(rows[-1]), flush=True)
                res["results"][where] = rows
        finally:
            server.stop()  # type: ignore[attr-defined]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "store_layout.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "store_layout.md").write_text(to_markdown(res) + "\n")
    print(to_markdown(res))


if __name__ == "__main__":
    main()
