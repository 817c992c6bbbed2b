"""Bad datasets, command by command: each is refused with one ``error:`` line that names the
file, sample or field, a non-zero exit, no traceback, and nothing written half-way.

Every case breaks a private copy of the tiny synthetic dataset (``broken_copy``) the way real
data breaks: a wrong dataroot or version, a deleted or torn table, a record without a field,
a dangling token, a missing / truncated / non-image camera file, a map expansion of an older
version. The commands run through the real ``bevctl`` entry point (``bevctl_cli``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bevctl.data.nuscenes import load_index
from bevctl.storage.labels import LabelStore

# ---- ways to break a dataset: (root, version) -> (dataroot, version, words the error must name)

Breaker = Callable[[Path, str], tuple[Path, str, tuple[str, ...]]]


def _missing_dataroot(root: Path, version: str):
    return root / "nope", version, ("dataroot not found", str(root / "nope"))


def _wrong_version(root: Path, version: str):
    return root, "v1.0-trainval", ("version folder not found", "v1.0-trainval", version)


def _missing_table(root: Path, version: str):
    (root / version / "ego_pose.json").unlink()
    return root, version, ("missing nuScenes table", "ego_pose.json")


def _table_missing_field(root: Path, version: str):
    path = root / version / "sample_data.json"
    records = json.loads(path.read_text())
    del records[3]["calibrated_sensor_token"]
    path.write_text(json.dumps(records))
    return root, version, ("sample_data.json", "record 3", "calibrated_sensor_token")


def _table_torn(root: Path, version: str):
    path = root / version / "scene.json"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return root, version, ("scene.json", "not valid JSON")


def _dangling_token(root: Path, version: str):
    path = root / version / "sample_data.json"
    records = json.loads(path.read_text())
    cam = next(r for r in records if "CAM_FRONT/" in r["filename"])
    cam["ego_pose_token"] = "f" * 32
    path.write_text(json.dumps(records))
    return root, version, ("f" * 32,)


def _missing_image(root: Path, version: str):
    records = json.loads((root / version / "sample_data.json").read_text())
    victim = root / next(r["filename"] for r in records if r["filename"].endswith(".jpg"))
    victim.unlink()
    return root, version, ("image not found", victim.name)


BREAKERS: dict[str, Breaker] = {
    "missing-dataroot": _missing_dataroot,
    "wrong-version": _wrong_version,
    "missing-table": _missing_table,
    "table-missing-field": _table_missing_field,
    "table-torn-json": _table_torn,
    "dangling-token": _dangling_token,
    "missing-image": _missing_image,
}


def _command(name: str, dataroot: Path, version: str, tmp: Path, ckpt: Path) -> tuple[list[object], Path]:
    """(arguments, the output path that must stay unwritten) of one command on that dataset."""
    data = ["--dataroot", dataroot, "--version", version]
    if name == "prepare-gt":
        out = tmp / "gt.zarr"
        return ["prepare-gt", *data, "--grid", "demo", "--classes", "hdmapnet", "--workers", "0", "--out", out], out
    if name == "pseudolabel":
        out = tmp / "labels.zarr"
        return ["pseudolabel", *data, "--model", "synth-gt", "--workers", "0", "--out", out], out
    train = ["--config", "toy", "--device", "cpu", "--max-steps", "1", "--workers", "0"]
    if name == "pretrain":
        out = tmp / "run"
        return ["pretrain", *data, "--labels", tmp / "labels.zarr", *train, "--out", out], out
    if name == "finetune":
        out = tmp / "run"
        return ["finetune", *data, *train, "--fraction", "0.5", "--out", out], out
    if name == "evaluate":
        out = tmp / "eval.json"
        return ["evaluate", "--checkpoint", ckpt, *data, "--device", "cpu", "--workers", "0", "--out", out], out
    raise ValueError(name)


COMMANDS = ("prepare-gt", "pseudolabel", "pretrain", "finetune", "evaluate")


# pseudolabel reads images as it goes (a missing one is test_pseudolabel_bad_image)
CASES = [(b, c) for b in BREAKERS for c in COMMANDS if not (b == "missing-image" and c == "pseudolabel")]


@pytest.mark.parametrize("breaker, command", CASES, ids=[f"{b}-{c}" for b, c in CASES])
def test_broken_dataset_is_refused(breaker, command, broken_copy, bevctl_cli, toy_checkpoint, tmp_path) -> None:
    dataroot, version, needles = BREAKERS[breaker](*broken_copy)
    args, out = _command(command, dataroot, version, tmp_path / "out", toy_checkpoint)
    bevctl_cli(*args).assert_refused(*needles)
    bevctl_cli(*args).assert_refused(*needles)  # a rerun says the same, and still writes nothing
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not out.exists()


def test_visualize_on_a_broken_dataset(broken_copy, bevctl_cli, toy_checkpoint, tmp_path) -> None:
    dataroot, version, needles = _table_missing_field(*broken_copy)
    out = tmp_path / "vis"
    res = bevctl_cli("visualize", "--checkpoint", toy_checkpoint, "--sample", "x" * 32, "--out", out,
                     "--dataroot", dataroot, "--version", version, "--device", "cpu")
    res.assert_refused(*needles)
    assert not out.exists()


def test_visualize_unknown_sample(tiny_synth, bevctl_cli, toy_checkpoint, tmp_path) -> None:
    root, version = tiny_synth
    out = tmp_path / "vis"
    res = bevctl_cli("visualize", "--checkpoint", toy_checkpoint, "--sample", "nosuchtoken", "--out", out,
                     "--dataroot", root, "--version", version, "--device", "cpu")
    res.assert_refused("nosuchtoken")
    assert not out.exists()


# ---- camera images -----------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _text(path: Path) -> None:
    path.write_text("this is not an image\n")


def _delete(path: Path) -> None:
    path.unlink()


IMAGE_BREAKS = {"truncated-jpeg": (_truncate, "corrupt image"), "text-named-jpg": (_text, "corrupt image"),
                "missing-jpeg": (_delete, "missing image")}


@pytest.mark.parametrize("kind", list(IMAGE_BREAKS))
def test_pseudolabel_bad_image(kind, broken_copy, bevctl_cli, tmp_path) -> None:
    root, version = broken_copy
    samples = load_index(root, version, use_cache=False, check_images=False).all_samples()
    victim = samples[2]
    path = Path(victim.cameras[4].image_path)
    breaker, reason = IMAGE_BREAKS[kind]
    breaker(path)
    out = tmp_path / "labels.zarr"
    args = ["pseudolabel", "--dataroot", root, "--version", version, "--model", "synth-gt", "--workers", "0",
            "--batch-size", "6", "--out", out]
    bevctl_cli(*args).assert_refused(str(path), reason, victim.token, "--on-error skip")
    # the job stopped at that sample: every sample before it (one per batch) is recorded done,
    # the bad one and everything after it is not
    store = LabelStore.open(out)
    k = store.index_of(victim.token)
    assert k > 0 and list(store.statuses()) == [1] * k + [0] * (len(samples) - k)
    # --on-error skip: the job finishes, the sample is recorded failed and named, exit 1
    res = bevctl_cli(*args[:-2], "--on-error", "skip", "--out", out)
    assert res.code == 1 and str(path) in res.out and "Traceback" not in res.text
    store = LabelStore.open(out)
    assert store.status(victim.token) == "failed" and store.counts() == {"todo": 0, "done": len(samples) - 1,
                                                                        "failed": 1}


def test_png_named_jpg_is_read_by_content(broken_copy, bevctl_cli, tmp_path) -> None:
    """A PNG under a .jpg name is a readable image (decoders sniff the content): labelled as usual."""
    root, version = broken_copy
    samples = load_index(root, version, use_cache=False, check_images=False).all_samples()
    path = Path(samples[1].cameras[0].image_path)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    Image.fromarray(pixels).save(path, format="PNG")
    assert path.read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "labels.zarr"
    res = bevctl_cli("pseudolabel", "--dataroot", root, "--version", version, "--model", "synth-gt",
                     "--workers", "0", "--out", out)
    assert res.code == 0, res.text
    assert LabelStore.open(out).counts()["done"] == len(samples)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_training_on_a_truncated_jpeg(workers, broken_copy, bevctl_cli, tmp_path) -> None:
    """The trainer decodes images in DataLoader workers: the error still arrives as one line."""
    root, version = broken_copy
    index = load_index(root, version, use_cache=False)
    first_train = index.samples_in("train")[0]
    path = Path(first_train.cameras[1].image_path)
    _truncate(path)
    out = tmp_path / "run"
    res = bevctl_cli("finetune", "--dataroot", root, "--version", version, "--config", "toy", "--device", "cpu",
                     "--workers", workers, "--epochs", "1", "--batch-size", "1", "--out", out)
    res.assert_refused(str(path))
    assert not (out / "last.pt").exists() and not list(out.glob("checkpoints/*.pt"))


# ---- map expansion -----------------------------------------------------------------------------


def _old_map(root: Path) -> Path:
    path = next((root / "maps" / "expansion").glob("*.json"))
    data = json.loads(path.read_text())
    assert data["version"] == "1.3"
    data["version"] = "1.2"
    path.write_text(json.dumps(data))
    return path


def test_map_expansion_without_version(broken_copy, bevctl_cli, tmp_path) -> None:
    """No "version" key (the devkit then assumes 1.0): refused when the map is loaded."""
    root, version = broken_copy
    path = next((root / "maps" / "expansion").glob("*.json"))
    data = json.loads(path.read_text())
    del data["version"]
    path.write_text(json.dumps(data))
    out = tmp_path / "run"
    bevctl_cli("finetune", "--dataroot", root, "--version", version, "--config", "toy", "--device", "cpu",
               "--workers", "0", "--max-steps", "1", "--out", out).assert_refused(path.name, "no version")
    assert not (out / "last.pt").exists()


def test_prepare_gt_with_an_old_map_expansion(broken_copy, bevctl_cli, tmp_path) -> None:
    root, version = broken_copy
    path = _old_map(root)
    out = tmp_path / "gt.zarr"
    bevctl_cli("prepare-gt", "--dataroot", root, "--version", version, "--grid", "demo", "--classes", "hdmapnet",
               "--workers", "0", "--out", out).assert_refused(path.name, "1.2")
    assert not out.exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_rasterising_on_the_fly_with_an_old_map_expansion(workers, broken_copy, bevctl_cli, tmp_path) -> None:
    root, version = broken_copy
    path = _old_map(root)
    out = tmp_path / "run"
    bevctl_cli("finetune", "--dataroot", root, "--version", version, "--config", "toy", "--device", "cpu",
               "--workers", workers, "--max-steps", "1", "--out", out).assert_refused(path.name, "1.2")
    assert not (out / "last.pt").exists()


def test_evaluate_with_an_old_map_expansion(broken_copy, bevctl_cli, toy_checkpoint, tmp_path) -> None:
    root, version = broken_copy
    path = _old_map(root)
    out = tmp_path / "eval.json"
    bevctl_cli("evaluate", "--checkpoint", toy_checkpoint, "--dataroot", root, "--version", version,
               "--device", "cpu", "--workers", "1", "--out", out).assert_refused(path.name, "1.2")
    assert not out.exists()
