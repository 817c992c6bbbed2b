"""Bad Zarr stores, command by command: a pseudo-label store or GT cache made for another
dataset, labeler, resolution or grid; the wrong kind of store; a torn store (a deleted
``zarr.json``, a corrupt chunk); a store with FAILED samples. Each is refused with one
``error:`` line naming the store (and the sample or field), or, for FAILED samples, skipped
by the trainer and refused by name where one sample is asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bevctl.config import class_set_from_name, grid_from_name
from bevctl.data.nuscenes import load_index
from bevctl.data.synth import SynthConfig, write_synthetic_dataset
from bevctl.pseudolabel.job import PseudolabelConfig, run_pseudolabel
from bevctl.storage.gt_store import prepare_gt
from bevctl.storage.labels import LabelStore

TRAIN = ["--config", "toy", "--device", "cpu", "--max-steps", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def stores(tiny_synth, tmp_path_factory) -> dict[str, Path]:
    """Stores of the tiny world (synth-gt labels at 45x80, demo-grid GT), a label store by
    another labeler (sleep:0), and a label store of another synthetic world."""
    root, version = tiny_synth
    d = tmp_path_factory.mktemp("stores")

    def labels(out: Path, dataroot: Path, model: str = "synth-gt") -> Path:
        run_pseudolabel(PseudolabelConfig(dataroot=str(dataroot), version=version, out=str(out), model=model,
                                          workers=0, resolution=(45, 80), progress=False))
        return out

    other = d / "other_world"
    write_synthetic_dataset(SynthConfig(scenes=1, samples_per_scene=2, image_hw=(32, 56), seed=7, workers=1),
                            other, progress=False)
    gt = d / "gt.zarr"
    prepare_gt(root, version, grid_from_name("demo"), class_set_from_name("hdmapnet"), gt, workers=0, progress=False)
    return {"labels": labels(d / "labels.zarr", root), "labels_sleep": labels(d / "sleep.zarr", root, "sleep:0"),
            "labels_other_world": labels(d / "other.zarr", other), "gt": gt}


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# ---- a store made for something else ----------------------------------------------------------


def test_pseudolabel_into_a_store_of_another_dataset(tiny_synth, stores, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    store = _copy(stores["labels_other_world"], tmp_path)
    before = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file())
    res = bevctl_cli("pseudolabel", "--dataroot", root, "--version", version, "--model", "synth-gt",
                     "--workers", "0", "--resolution", "45x80", "--out", store)
    res.assert_refused(store, "samples", "--overwrite")
    after = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file())
    assert before == after  # not touched


@pytest.mark.parametrize("option, needle", [(["--resolution", "40x72"], "resolution=[45, 80]"),
                                            (["--model", "sleep:0", "--resolution", "45x80"], 'model_id="synth-gt"')])
def test_pseudolabel_into_a_store_of_another_labeler_or_resolution(option, needle, tiny_synth, stores, bevctl_cli,
                                                                   tmp_path) -> None:
    root, version = tiny_synth
    store = _copy(stores["labels"], tmp_path)
    args = ["--model", "synth-gt", *option] if option[0] == "--resolution" else option
    res = bevctl_cli("pseudolabel", "--dataroot", root, "--version", version, "--workers", "0", *args, "--out", store)
    res.assert_refused(store, needle, "--overwrite")


def test_pretrain_on_labels_of_another_dataset(tiny_synth, stores, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    out = tmp_path / "run"
    res = bevctl_cli("pretrain", "--dataroot", root, "--version", version, "--labels", stores["labels_other_world"],
                     *TRAIN, "--out", out)
    res.assert_refused(stores["labels_other_world"])
    assert not (out / "last.pt").exists()


def test_pretrain_on_labels_of_a_labeler_without_label_map(tiny_synth, stores, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    out = tmp_path / "run"
    res = bevctl_cli("pretrain", "--dataroot", root, "--version", version, "--labels", stores["labels_sleep"],
                     *TRAIN, "--out", out)
    res.assert_refused("sleep:0")
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_gt_cache_of_another_grid(command, tiny_synth, stores, bevctl_cli, toy_checkpoint, tmp_path) -> None:
    """The toy run is on the demo grid; a GT cache made for another grid is refused."""
    root, version = tiny_synth
    grid_yaml = tmp_path / "grid.yaml"
    grid_yaml.write_text("x_min: -8.0\nx_max: 8.0\ny_min: -4.0\ny_max: 4.0\nresolution: 0.5\n")
    gt = tmp_path / "gt_small.zarr"
    res = bevctl_cli("prepare-gt", "--dataroot", root, "--version", version, "--grid", grid_yaml,
                     "--classes", "hdmapnet", "--workers", "0", "--out", gt)
    assert res.code == 0, res.text
    data = ["--dataroot", root, "--version", version, "--gt", gt]
    if command == "finetune":
        out = tmp_path / "run"
        res = bevctl_cli("finetune", *data, *TRAIN, "--out", out)
        assert not (out / "last.pt").exists()
    else:
        out = tmp_path / "eval.json"
        res = bevctl_cli("evaluate", "--checkpoint", toy_checkpoint, *data, "--device", "cpu", "--workers", "0",
                         "--out", out)
        assert not out.exists()
    res.assert_refused(gt, "grid", "resolution")


def test_wrong_kind_of_store(tiny_synth, stores, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    res = bevctl_cli("pretrain", "--dataroot", root, "--version", version, "--labels", stores["gt"], *TRAIN,
                     "--out", tmp_path / "run")
    res.assert_refused(stores["gt"], "'bev_gt' store", "'pseudolabels'")
    res = bevctl_cli("finetune", "--dataroot", root, "--version", version, "--gt", stores["labels"], *TRAIN,
                     "--out", tmp_path / "run")
    res.assert_refused(stores["labels"], "'pseudolabels' store", "'bev_gt'")
    store = _copy(stores["labels"], tmp_path)
    res = bevctl_cli("prepare-gt", "--dataroot", root, "--version", version, "--grid", "demo", "--classes",
                     "hdmapnet", "--workers", "0", "--out", store)
    res.assert_refused(store, "'pseudolabels' store")
    not_a_store = tmp_path / "notes"
    not_a_store.mkdir()
    res = bevctl_cli("pseudolabel", "--dataroot", root, "--version", version, "--model", "synth-gt",
                     "--workers", "0", "--out", not_a_store)
    res.assert_refused(not_a_store, "not a Zarr store")
    assert list(not_a_store.iterdir()) == []


# ---- torn stores -------------------------------------------------------------------------------


def _first_chunk(array_dir: Path) -> Path:
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())[0]


TEARS = {
    "root-zarr-json": lambda s: (s / "zarr.json").unlink(),
    "masks-zarr-json": lambda s: (s / "masks" / "zarr.json").unlink(),
    "done-array-deleted": lambda s: shutil.rmtree(s / "done"),
    "tokens-array-deleted": lambda s: shutil.rmtree(s / "tokens"),
    "mask-chunk-corrupt": lambda s: _first_chunk(s / "masks").write_bytes(b"\x00garbage"),
}


@pytest.mark.parametrize("tear", list(TEARS))
def test_torn_label_store(tear, tiny_synth, stores, bevctl_cli, tmp_path) -> None:
    root, version = tiny_synth
    store = _copy(stores["labels"], tmp_path)
    TEARS[tear](store)
    out = tmp_path / "run"
    res = bevctl_cli("pretrain", "--dataroot", root, "--version", version, "--labels", store, *TRAIN,
                     "--epochs", "1", "--batch-size", "1", "--out", out)
    if tear == "masks-zarr-json":
        # zarr-python reads the copy in the consolidated metadata (written at the end of the job):
        # bevctl trains on; other readers need the file: verify names it, --repair rewrites it
        assert res.code == 0, res.text
        found = bevctl_cli("verify", store, "--repair")
        assert found.code == 1 and "damaged: masks/zarr.json is missing" in found.out, found.text
        assert (store / "masks" / "zarr.json").is_file() and bevctl_cli("verify", store).code == 0
        return
    res.assert_refused(store)
    assert not (out / "last.pt").exists()
    res = bevctl_cli("labels", "stats", store)
    if tear == "done-array-deleted":
        # the consolidated metadata still describes `done`; its chunk is gone, so it reads as its
        # fill value: nothing done, nothing trusted (pretrain above: "no usable training samples")
        assert res.code == 0 and "0 done" in res.out, res.text
        found = bevctl_cli("verify", store)
        assert found.code == 1 and "damaged: done/zarr.json is missing" in found.out, found.text
    else:
        res.assert_refused(store)
    # the job refuses to resume into it too (or, for a torn chunk of a DONE sample, skips it: the
    # chunk is only read by the trainer); --overwrite rebuilds it whole
    res = bevctl_cli("pseudolabel", "--dataroot", root, "--version", version, "--model", "synth-gt",
                     "--workers", "0", "--resolution", "45x80", "--out", store, "--overwrite")
    assert res.code == 0, res.text
    assert LabelStore.open(store).counts()["done"] == len(load_index(root, version).all_samples())


@pytest.mark.parametrize("tear", ["root-zarr-json", "bev-chunk-corrupt"])
def test_torn_gt_cache(tear, tiny_synth, stores, bevctl_cli, toy_checkpoint, tmp_path) -> None:
    root, version = tiny_synth
    gt = _copy(stores["gt"], tmp_path)
    if tear == "root-zarr-json":
        (gt / "zarr.json").unlink()
    else:
        for chunk in (gt / "bev" / "c").rglob("*"):
            if chunk.is_file():
                chunk.write_bytes(b"\x01torn")
    out = tmp_path / "eval.json"
    res = bevctl_cli("evaluate", "--checkpoint", toy_checkpoint, "--dataroot", root, "--version", version,
                     "--gt", gt, "--device", "cpu", "--workers", "1", "--out", out)
    res.assert_refused(gt)
    assert not out.exists()


# ---- FAILED samples ----------------------------------------------------------------------------


def test_store_with_failed_samples(broken_copy, bevctl_cli, tmp_path) -> None:
    """A store whose job recorded a FAILED sample (--on-error skip): the trainer skips it, the
    viewer refuses it by name, and a store where every sample failed is refused by pretrain."""
    root, version = broken_copy
    index = load_index(root, version, use_cache=False)
    train_tokens = [s.token for s in index.samples_in("train")]
    victim = index.samples[train_tokens[0]]
    Path(victim.cameras[3].image_path).write_bytes(b"not a jpeg")
    labels = tmp_path / "labels.zarr"
    res = bevctl_cli("pseudolabel", "--dataroot", root, "--version", version, "--model", "synth-gt", "--workers",
                     "0", "--resolution", "45x80", "--on-error", "skip", "--out", labels)
    assert res.code == 1 and "1 failed" in res.out
    res = bevctl_cli("labels", "show", labels, "--sample", victim.token, "--out", tmp_path / "show.png")
    res.assert_refused(victim.token, "failed")
    assert not (tmp_path / "show.png").exists()
    out = tmp_path / "run"
    res = bevctl_cli("pretrain", "--dataroot", root, "--version", version, "--labels", labels, *TRAIN,
                     "--batch-size", "1", "--out", out)
    assert res.code == 0, res.text
    import json

    assert json.loads((out / "scenes.json").read_text())["skipped"]["failed_or_todo"] == 1
    # every training sample failed: nothing to train on, said in one line
    for token in train_tokens[1:]:
        Path(index.samples[token].cameras[0].image_path).write_bytes(b"not a jpeg")
    labels2 = tmp_path / "labels2.zarr"  # (a rerun into labels.zarr would not redo its DONE samples)
    res = bevctl_cli("pseudolabel", "--dataroot", root, "--version", version, "--model", "synth-gt", "--workers",
                     "0", "--resolution", "45x80", "--on-error", "skip", "--out", labels2)
    assert res.code == 1, res.text
    assert LabelStore.open(labels2).counts()["failed"] == len(train_tokens)
    res = bevctl_cli("pretrain", "--dataroot", root, "--version", version, "--labels", labels2, *TRAIN,
                     "--out", tmp_path / "run2")
    res.assert_refused("no usable training samples", "failed")
