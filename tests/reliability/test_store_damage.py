"""Damaged stores: a chunk of a finished sample (or a metadata file) deleted, truncated, bit-flipped
or zero-filled in a copy of an uninterrupted run's label store / GT cache (conftest ``ref_labels``,
``ref_gt``). Each case checks that ``bevctl verify`` finds it (exit 1, naming the sample and
camera), that training refuses it with one line (``--on-corrupt fail``, the default) or skips
that sample's labels and counts them (``--on-corrupt skip``), and that ``verify --repair`` + a
rerun of the same command gives a store bit-identical to the undamaged one. Damaged metadata
cannot be repaired by marking samples: verify says so, and the command with ``--overwrite``
rebuilds the same store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from faultkit import assert_same_store

from bevctl.data.nuscenes import load_index
from bevctl.storage.base import SampleStore

TRAIN = ["--config", "toy", "--device", "cpu", "--max-steps", "2", "--workers", "0"]  # 2 x 2 = the 4 train samples


def damage(path: Path, how: str) -> None:
    """Damage one file the way disks, copies and people do."""
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-fill":
        path.write_bytes(bytes(len(data)))
    elif how == "bit-flip":
        flipped = bytearray(data)
        k = data.find(b"{") if path.name == "zarr.json" else len(data) // 2  # JSON: break its structure
        flipped[k] ^= 0x04
        path.write_bytes(bytes(flipped))
    else:
        raise ValueError(how)


def _train_token(world, store: Path, kind: str) -> tuple[str, int]:
    """The first sample of the train split and its index in ``store``."""
    token = load_index(world.root, world.version).samples_in("train")[0].token
    return token, SampleStore.open(store, kind).index_of(token)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


CHUNK_DAMAGE = ["delete", "truncate", "bit-flip", "zero-fill"]
FAST = {("labels", "delete"), ("labels", "zero-fill"), ("gt", "bit-flip"),  # the rest: @slow (seconds each)
        ("zarr.json", "truncate"), ("masks/zarr.json", "delete"), ("tokens/c/0", "zero-fill"), ("done/c/0", "bit-flip")}


def _cases(names: list[str]) -> list:
    return [pytest.param(name, how, id=f"{name}-{how}", marks=() if (name, how) in FAST else (pytest.mark.slow,))
            for name in names for how in CHUNK_DAMAGE]


@pytest.mark.parametrize("kind, how", _cases(["labels", "gt"]))
def test_damaged_chunk_is_found_refused_skipped_and_repaired(kind: str, how: str, fault_world, ref_labels, ref_gt,
                                                             bevctl_cli, tmp_path: Path) -> None:
    w = fault_world
    ref = ref_labels if kind == "labels" else ref_gt
    store = _copy(ref, tmp_path)
    token, i = _train_token(w, store, "pseudolabels" if kind == "labels" else "bev_gt")
    array = "masks" if kind == "labels" else "bev"
    chunk = store / array / "c" / str(i) / "0" / "0" / ("0" if kind == "labels" else "")  # the sample's one object
    where = f"{array} chunk"
    damage(chunk, how)

    found = bevctl_cli("verify", store)
    assert found.code == 1, found.text
    assert f"damaged: sample {token}: {array}: chunk c/{i}/0/0" in found.out, found.out
    assert found.out.count("damaged: sample") == 1, found.out  # only the damaged one

    if how in ("delete", "bit-flip"):  # training: refused by default, skipped when asked
        args = (["pretrain", *w.data(), "--labels", store] if kind == "labels"
                else ["finetune", *w.data(), "--gt", store, "--fraction", "1.0"])
        refused = bevctl_cli(*args, *TRAIN, "--out", tmp_path / "run-fail")
        refused.assert_refused(store, f"sample '{token}'", where, "--on-corrupt skip")
        skipped = bevctl_cli(*args, *TRAIN, "--on-corrupt", "skip", "--out", tmp_path / "run-skip")
        assert skipped.code == 0, skipped.text
        rows = [json.loads(x) for x in (tmp_path / "run-skip" / "metrics.jsonl").read_text().splitlines()]
        assert max(r.get("skipped_corrupt", 0) for r in rows) == 1, rows

    repaired = bevctl_cli("verify", store, "--repair")
    assert repaired.code == 1 and "repaired: 1 sample(s) marked todo" in repaired.out, repaired.text
    rerun = bevctl_cli(*(w.pseudolabel(store) if kind == "labels" else w.prepare_gt(store)))
    assert rerun.code == 0, rerun.text
    assert (" 1 labeled" not in rerun.out) if kind == "gt" else ("6 labeled" in rerun.out), rerun.out
    assert_same_store(ref, store)
    clean = bevctl_cli("verify", store)
    assert clean.code == 0 and "all good" in clean.out, clean.text


METADATA = {  # file -> what verify names
    "zarr.json": "zarr.json",
    "masks/zarr.json": "masks/zarr.json",
    "tokens/c/0": "tokens",
    "done/c/0": "done",
}


@pytest.mark.parametrize("name, how", _cases(list(METADATA)))
def test_damaged_metadata_is_found_and_rebuilt(name: str, how: str, fault_world, ref_labels, bevctl_cli,
                                               tmp_path: Path) -> None:
    w = fault_world
    store = _copy(ref_labels, tmp_path)
    damage(store / name, how)
    found = bevctl_cli("verify", store, "--repair")
    if name == "done/c/0" and how == "delete":
        # a lost done record reads as "nothing done": safe, the rerun redoes every sample
        assert found.code == 0 and "0 done" in found.out and "all good" in found.out, found.text
    elif name == "masks/zarr.json":  # zarr-python reads the consolidated copy; other readers this file
        assert found.code == 1 and "damaged: masks/zarr.json" in found.out, found.text
        assert "repaired: rewrote masks/zarr.json" in found.out, found.text
        assert_same_store(ref_labels, store)  # byte for byte, no rerun needed
        assert bevctl_cli("verify", store).code == 0
    else:
        assert found.code == 1, found.text
        assert "metadata damaged" in found.out and METADATA[name] in found.out, found.text
        assert "--overwrite" in found.out, found.text
        training = bevctl_cli("pretrain", *w.data(), "--labels", store, *TRAIN, "--out", tmp_path / "run")
        training.assert_refused(store)
    rebuilt = bevctl_cli(*w.pseudolabel(store), "--overwrite")
    assert rebuilt.code == 0, rebuilt.text
    assert_same_store(ref_labels, store)


def test_on_corrupt_must_be_fail_or_skip(fault_world, ref_labels, bevctl_cli, tmp_path: Path) -> None:
    res = bevctl_cli("pretrain", *fault_world.data(), "--labels", ref_labels, *TRAIN, "--on-corrupt", "ignore",
                     "--out", tmp_path / "run")
    res.assert_refused("--on-corrupt", "fail|skip")
    assert not (tmp_path / "run").exists()


def test_verify_checks_the_tokens_against_the_dataset(fault_world, ref_labels, ref_gt, bevctl_cli, tmp_path) -> None:
    from bevctl.data.synth import SynthConfig, write_synthetic_dataset

    for store in (ref_labels, ref_gt):
        ok = bevctl_cli("verify", store, "--dataroot", fault_world.root)
        assert ok.code == 0 and "all good" in ok.out, ok.text
    other = tmp_path / "other"  # another world: same version name, other tokens
    write_synthetic_dataset(SynthConfig(scenes=1, samples_per_scene=2, image_hw=(32, 56), seed=7, workers=1), other,
                            progress=False)
    bad = bevctl_cli("verify", ref_labels, "--dataroot", other)
    assert bad.code == 1 and "metadata damaged" in bad.out and "holds 8 samples" in bad.out, bad.text
