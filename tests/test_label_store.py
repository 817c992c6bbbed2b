"""The pseudo-label store: creation at final shape, resume rules, reader API, stats."""

from __future__ import annotations

import numpy as np
import pytest

from bevctl.data.records import CAMERAS
from bevctl.errors import BevctlError
from bevctl.storage.labels import DONE, FAILED, LabelStore, LabelStoreSpec, label_stats, open_mask_arrays

H, W = 30, 40


def _spec(**kw) -> LabelStoreSpec:
    base = dict(
        model_id="m", weights_hash="abc", id2label={0: "road", 1: "lane", 2: "sky"}, resolution=(H, W),
        dataset_version="v1.0-synth", splits=("train",), tokens=("t0", "t1", "t2"), confidence=True,
    )
    base.update(kw)
    return LabelStoreSpec(**base)


def _fill(path, idx: int, value_fn) -> np.ndarray:
    masks, conf = open_mask_arrays(path, confidence=True)
    out = np.stack([value_fn(c) for c in range(len(CAMERAS))]).astype(np.uint8)
    for c in range(len(CAMERAS)):
        masks[idx, c] = out[c]
        conf[idx, c] = np.full((H, W), 200, np.uint8)
    return out


def test_create_write_read_and_stats(tmp_path) -> None:
    path = tmp_path / "labels.zarr"
    store, created = LabelStore.open_for_writing(path, _spec(), "/data/root")
    assert created and store.tokens == ["t0", "t1", "t2"] and store.resolution == (H, W)
    assert store.cameras == CAMERAS and store.id2label == {0: "road", 1: "lane", 2: "sky"}
    assert [store.status(t) for t in store.tokens] == ["todo"] * 3
    codecs = [c.to_dict() for c in store._masks.metadata.codecs]
    assert [c["name"] for c in codecs] == ["bytes", "zstd"] and codecs[1]["configuration"]["checksum"]
    assert store._masks.fill_value == 255  # a missing chunk reads as ignore, never as a class
    rng = np.random.default_rng(0)
    m0 = _fill(path, 0, lambda c: rng.integers(0, 3, (H, W)))
    m2 = _fill(path, 2, lambda c: np.full((H, W), 1))
    store.mark([0, 2], DONE)
    store.mark([1], FAILED)

    reader = LabelStore.open(path)
    np.testing.assert_array_equal(reader.get("t0"), m0)
    np.testing.assert_array_equal(reader.get("t2"), m2)
    assert reader.get("t0").dtype == np.uint8 and reader.get("t0").shape == (6, H, W)
    assert (reader.get_confidence("t2") == 200).all()
    assert [reader.status(t) for t in reader.tokens] == ["done", "failed", "done"]
    assert reader.done_tokens() == ["t0", "t2"]
    assert reader.dataroot == "/data/root"
    with pytest.raises(BevctlError, match="t1.*failed"):
        reader.get("t1")  # a failed sample has no trustworthy masks
    with pytest.raises(BevctlError, match="no sample 'nope'"):
        reader.get("nope")

    stats = label_stats(path)
    assert stats["samples"] == {"todo": 0, "done": 2, "failed": 1}
    hist = {c["name"]: c["pixels"] for c in stats["classes"]}
    expected = np.bincount(np.concatenate([m0.ravel(), m2.ravel()]), minlength=3)
    assert hist == {"road": expected[0], "lane": expected[1], "sky": expected[2]}
    cover = {c["name"]: c["image_coverage"] for c in stats["classes"]}
    assert cover["lane"] == 1.0 and cover["road"] == pytest.approx(0.5)  # t2 is all lane
    assert stats["mask_bytes_raw"] == 2 * 6 * H * W and stats["compression_ratio"] > 1


def test_resume_keeps_done_and_refuses_incompatible(tmp_path) -> None:
    path = tmp_path / "labels.zarr"
    store, _ = LabelStore.open_for_writing(path, _spec(), "/a")
    m0 = _fill(path, 0, lambda c: np.full((H, W), c % 3))
    store.mark([0], DONE)
    # a torn write left behind by a killed worker is removed on resume
    partial = path / "masks" / "c" / "1" / "0" / "0" / "0.deadbeef.partial"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"junk")

    again, created = LabelStore.open_for_writing(path, _spec(), "/moved/root")
    assert not created and not partial.exists()
    assert list(again.todo_indices()) == [1, 2]
    np.testing.assert_array_equal(again.get("t0"), m0)
    assert again.dataroot == "/moved/root"  # the dataroot may move; it is not validated

    for change, what in [
        (dict(model_id="other"), "model_id"),
        (dict(weights_hash="def"), "weights_hash"),
        (dict(resolution=(H, W + 8)), "resolution"),
        (dict(id2label={0: "road", 1: "lane"}), "id2label"),
        (dict(dataset_version="v1.0-mini"), "dataset_version"),
        (dict(confidence=False), "confidence"),
        (dict(tokens=("t0", "t1")), "samples"),
    ]:
        with pytest.raises(BevctlError, match=f"{what}.*--overwrite"):
            LabelStore.open_for_writing(path, _spec(**change), "/a")
    fresh, created = LabelStore.open_for_writing(path, _spec(model_id="other"), "/a", overwrite=True)
    assert created and fresh.model_id == "other" and fresh.counts()["done"] == 0


def test_open_rejects_non_stores(tmp_path) -> None:
    with pytest.raises(BevctlError, match="no Zarr store"):
        LabelStore.open(tmp_path / "missing.zarr")
    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr" / "file").write_text("x")
    with pytest.raises(BevctlError, match="not a Zarr store"):
        LabelStore.open_for_writing(tmp_path / "x.zarr", _spec(), "/a")


def test_run_length_codec_roundtrip_and_size(tmp_path) -> None:
    import io

    import zarr
    from PIL import Image

    from bevctl.storage.base import default_compressors
    from bevctl.storage.rle import mask_compressors, rle_decode, rle_encode

    rng = np.random.default_rng(1)
    for data in (np.zeros(0, np.uint8), np.full(70000, 7, np.uint8), np.arange(300).astype(np.uint8),
                 rng.integers(0, 3, 5000).astype(np.uint8)):  # runs longer than 65535, wraps, noise
        np.testing.assert_array_equal(rle_decode(np.frombuffer(rle_encode(data), np.uint8)), data)
    with pytest.raises(ValueError, match="cannot hold"):
        rle_decode(np.frombuffer(rle_encode(np.arange(10, dtype=np.uint8)), np.uint8)[:-1])

    # label-like masks: a few polygons on a 225x400 image
    yy, xx = np.mgrid[0:225, 0:400]
    masks = []
    for k in range(6):
        m = np.zeros((225, 400), np.uint8)
        m[yy > 100 + 5 * k] = 1  # road below the horizon
        m[(yy > 120) & (np.abs(xx - 200 - 0.8 * (yy - 120) * (k - 3)) < 3 + yy / 40)] = 2  # a lane line
        m[(yy > 180) & ((xx // 12) % 2 == 0) & (xx > 60) & (xx < 340)] = 4  # a zebra crossing
        masks.append(m)
    sizes = {}
    for name, comp in (("rle", mask_compressors()), ("blosc", default_compressors())):
        arr = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=(6, 225, 400), chunks=(1, 225, 400),
                                dtype="uint8", compressors=comp, fill_value=0)
        for k, m in enumerate(masks):
            arr[k] = m
        back = zarr.open_array(str(tmp_path / f"{name}.zarr"), mode="r")  # codec found by name
        np.testing.assert_array_equal(back[:], np.stack(masks))
        sizes[name] = sum(p.stat().st_size for p in (tmp_path / f"{name}.zarr" / "c").rglob("*") if p.is_file())
    png = 0
    for m in masks:
        buf = io.BytesIO()
        Image.fromarray(m).save(buf, format="PNG")
        png += buf.tell()
    assert sizes["rle"] < 0.5 * png and sizes["rle"] < sizes["blosc"]
    assert 225 * 400 * 6 / sizes["rle"] > 50


def test_missing_or_corrupt_chunk_names_the_sample(tmp_path) -> None:
    from bevctl.storage.codecs import CorruptChunk

    path = tmp_path / "labels.zarr"
    store, _ = LabelStore.open_for_writing(path, _spec(), "/a")
    assert store._masks.chunks == (1, 6, H, W)  # one object per sample
    for i in range(3):
        _fill(path, i, lambda c: np.zeros((H, W)))  # class 0 everywhere: the old fill value
    store.mark([0, 1, 2], DONE)
    (path / "masks" / "c" / "1" / "0" / "0" / "0").unlink()  # sample t1: deleted
    chunk = path / "masks" / "c" / "2" / "0" / "0" / "0"  # sample t2: one bit flipped
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x04
    chunk.write_bytes(bytes(data))
    reader = LabelStore.open(path)
    assert (reader.get("t0") == 0).all()
    with pytest.raises(CorruptChunk, match="sample 't1': missing masks chunk") as e:
        reader.get("t1")
    assert (e.value.token, e.value.camera) == ("t1", None)
    with pytest.raises(CorruptChunk, match="sample 't2': corrupt masks chunk"):
        reader.get("t2")
    with pytest.raises(BevctlError, match="sample 't1': missing masks chunk"):
        label_stats(path)


def test_old_layout_chunk_per_camera_names_the_camera(tmp_path) -> None:
    """Stores of the old layout (a chunk per (sample, camera)) still open; damage names the camera."""
    import zarr

    from bevctl.storage.codecs import CorruptChunk, IGNORE, mask_compressors, read_sample

    arr = zarr.create_array(str(tmp_path / "m.zarr"), shape=(2, 6, H, W), chunks=(1, 1, H, W), dtype="uint8",
                            fill_value=IGNORE, compressors=mask_compressors())
    arr[:] = 1
    (tmp_path / "m.zarr" / "c" / "1" / "2" / "0" / "0").unlink()
    assert (read_sample(arr, 0, "s", "t0", CAMERAS) == 1).all()
    with pytest.raises(CorruptChunk, match=f"sample 't1' camera {CAMERAS[2]}: missing"):
        read_sample(arr, 1, "s", "t1", CAMERAS)


PLAIN_READER = """
import sys
sys.modules["bevctl"] = None  # this interpreter cannot import bevctl: plain zarr only
try:
    import bevctl  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("bevctl is importable")
import numpy as np
import zarr

group = zarr.open_consolidated(sys.argv[1], zarr_format=3)  # the job's consolidated metadata
masks = group["masks"]
print([c.to_dict()["name"] for c in masks.metadata.codecs], masks.fill_value)
np.save(sys.argv[2], masks[:])
"""


def test_masks_open_with_plain_zarr_without_bevctl(tmp_path) -> None:
    import subprocess
    import sys

    import zarr

    from bevctl.storage.rle import RunLengthCodec

    path = tmp_path / "labels.zarr"
    store, _ = LabelStore.open_for_writing(path, _spec(), "/a")
    rng = np.random.default_rng(2)
    written = np.stack([_fill(path, i, lambda c: rng.integers(0, 3, (H, W))) for i in range(3)])
    store.mark([0, 1, 2], DONE)
    store.consolidate()
    cmd = [sys.executable, "-I", "-c", PLAIN_READER, str(path), str(tmp_path / "out.npy")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["['bytes',", "'zstd']", "255"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), written)

    # the same reader fails on masks of the old layout (bevctl's own run-length codec)
    old = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=3)
    old.create_array("masks", shape=(1, 6, H, W), chunks=(1, 1, H, W), dtype="uint8", compressors=(RunLengthCodec(),))
    with pytest.warns(UserWarning, match="Consolidated metadata"):
        zarr.consolidate_metadata(str(tmp_path / "old.zarr"))
    cmd[-2] = str(tmp_path / "old.zarr")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode != 0 and "No module named 'bevctl" in res.stderr, res.stderr[-2000:]  # needs bevctl
