"""`bevctl predict` on the tiny synthetic world: store contents vs evaluate, history rules,
resume exactly once, other grids / class sets, bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from bevctl.config import class_set_from_name, dataclass_to_dict
from bevctl.data.nuscenes import load_index
from bevctl.errors import BevctlError
from bevctl.storage.base import DONE, TODO, SampleStore
from bevctl.storage.predictions import PredictionStore
from bevctl.train.config import TrainConfig
from bevctl.train.build import build_model
from bevctl.train.loop import RunSpec, train
from bevctl.train.predict import contiguous_runs, predict, work_indices

from test_dataset import make_gt_store, make_label_store


def train_toy_runs(root: Path, version: str, work: Path) -> dict[str, Path]:
    """A temporal toy pretraining run and a toy fine-tuning run from it (a few steps each)."""
    torch.set_num_threads(1)
    labels = make_label_store(root, version, work / "labels.zarr", resolution=(45, 80))
    gt = make_gt_store(root, version, work / "gt.zarr")
    runs = {}
    for mode, name in (("pretrain", "pre"), ("finetune", "fin")):
        cfg = TrainConfig(model="toy", grid="demo", batch_size=1, epochs=100, max_steps=3, lr=3e-3, warmup_steps=1,
                          num_workers=0, temporal_weight=0.5, checkpoint_every=100)
        runs[name] = Path(train(RunSpec(mode=mode, cfg=cfg, run_dir=work / name, dataroot=str(root), version=version,
                                        labels=str(labels) if mode == "pretrain" else None,
                                        gt=str(gt) if mode == "finetune" else None, device="cpu", progress=False)))
    runs["labels"], runs["gt"] = labels, gt
    return runs


@pytest.fixture(scope="module")
def toy_runs(tiny_synth, tmp_path_factory) -> dict[str, Path]:
    root, version = tiny_synth
    return train_toy_runs(root, version, tmp_path_factory.mktemp("toy_runs"))


def _preds(path: Path) -> dict[str, np.ndarray]:
    store = PredictionStore.open(path)
    return {t: store.get(t).ids for t in store.tokens}


@pytest.mark.parametrize("run", ["pre", "fin"])
def test_store_holds_what_evaluate_computes(tiny_synth, toy_runs, tmp_path: Path, run: str, run_bevctl) -> None:
    from bevctl.train.evaluate import evaluate

    root, version = tiny_synth
    out = tmp_path / "preds.zarr"
    assert run_bevctl("predict", "--checkpoint", str(toy_runs[run]), "--dataroot", str(root), "--version", version,
                      "--split", "val", "--out", str(out), "--probabilities", "--device", "cpu", "--workers", "0",
                      "--batch-size", "3") == 0
    store = PredictionStore.open(out)
    index = load_index(root, version)
    val = index.samples_in("val")
    assert store.tokens == [s.token for s in val] and store.done_tokens == store.tokens
    assert store.class_names == ("background", "boundary", "ped_crossing", "divider") and store.grid.shape == (128, 64)
    # the same confusion matrix as evaluate's forward on the same samples (pre: with history)
    res = evaluate(toy_runs[run], str(root), version, "val", str(toy_runs["gt"]), device="cpu", num_workers=0,
                   progress=False)
    assert res["temporal"] == (run == "pre")
    from bevctl.storage.gt_store import GTStore

    gt = GTStore.open(toy_runs["gt"])
    conf = np.zeros((4, 4), np.int64)
    for s in val:
        p = store.get(s.token)
        np.add.at(conf, (gt.get(s.token).ravel(), p.ids.ravel()), 1)
        np.testing.assert_array_equal(p.global_T_ego, s.global_T_ego)
        assert p.scene == s.scene_name and p.index_in_scene == s.index_in_scene
        assert p.history == (run == "pre" and s.index_in_scene > 0)
        # probabilities: quantised softmax, their argmax is the stored map up to quantisation ties
        assert p.probabilities.shape == (4, 128, 64)
        assert np.allclose(p.probabilities.sum(0), 1.0, atol=4 / 255)
        assert (p.probabilities.argmax(0) == p.ids).mean() > 0.99
    assert conf.tolist() == res["confusion"]
    # the reader's global coordinates: the ego pose applied to the ego cell centres
    p = store.get(val[1].token)
    xy = p.ego_xy()
    assert xy.shape == (128, 64, 2) and xy[0, 0].tolist() == [-15.875, -7.875]
    expect = (p.global_T_ego @ np.array([xy[5, 7, 0], xy[5, 7, 1], 0.0, 1.0]))[:2]
    np.testing.assert_allclose(p.global_xy()[5, 7], expect)
    assert [q.index_in_scene for q in store.iter_scene(val[0].scene_name)] == list(range(len(val)))


def test_a_frame_model_is_the_model_on_each_sample(tiny_synth, toy_runs, tmp_path: Path) -> None:
    """Frame by frame (fine-tuned): each stored map is the model's argmax on that sample alone."""
    from bevctl.train.dataset import TrainDataset
    from bevctl.train.build import load_trained_model

    root, version = tiny_synth
    out = tmp_path / "p.zarr"
    predict(toy_runs["fin"], str(root), version, out, scenes=["scene-0002"], device="cpu", num_workers=0,
            batch_size=2, progress=False)
    trained = load_trained_model(toy_runs["fin"], torch.device("cpu"))
    index = load_index(root, version)
    samples = index.scene_samples("scene-0002")
    ds = TrainDataset(samples, index.samples, trained.setup.image_hw)
    preds = _preds(out)
    for k, s in enumerate(samples):
        item = ds[k]
        with torch.no_grad():
            logits = trained.model(item["images"][None], item["pix_T_cam"][None], item["ego_T_cam"][None]).logits
        np.testing.assert_array_equal(preds[s.token], logits.argmax(1)[0].numpy())


def test_history_resets_at_scene_boundaries_and_gaps(tiny_synth, toy_runs, tmp_path: Path) -> None:
    root, version = tiny_synth
    full, subset = tmp_path / "full.zarr", tmp_path / "subset.zarr"
    predict(toy_runs["pre"], str(root), version, full, device="cpu", num_workers=0, progress=False)
    refs = ["scene-0002:0", "scene-0001:3", "scene-0001:0", "scene-0001:2"]  # given out of order
    predict(toy_runs["pre"], str(root), version, subset, samples=refs, device="cpu", num_workers=0, progress=False)
    store = PredictionStore.open(subset)
    order = [(p.scene, p.index_in_scene, p.history) for sc in store.scenes for p in store.iter_scene(sc)]
    # scene order; :2 has no history (its previous keyframe :1 was not chosen), :3 has :2's;
    # scene-0002's first frame starts afresh although scene-0001's last frame ran just before it
    assert order == [("scene-0001", 0, False), ("scene-0001", 2, False), ("scene-0001", 3, True),
                     ("scene-0002", 0, False)]
    a, b = _preds(full), _preds(subset)
    index = load_index(root, version)
    tok = {ref: index.find_sample(ref).token for ref in refs}
    # a frame without history is the same wherever it runs; the first frame of a scene likewise
    np.testing.assert_array_equal(a[tok["scene-0001:0"]], b[tok["scene-0001:0"]])
    np.testing.assert_array_equal(a[tok["scene-0002:0"]], b[tok["scene-0002:0"]])
    full_store = PredictionStore.open(full)
    assert [p.history for p in full_store.iter_scene("scene-0002")] == [False, True, True, True]


def test_work_indices_rerun_a_chain_from_its_start() -> None:
    history = [False, True, True, True, False, True]  # chains [0..3] and [4..5]
    assert work_indices([2], history) == [0, 1, 2]
    assert work_indices([5, 1], history) == [0, 1, 4, 5]
    assert work_indices([3], [False] * 6) == [3]


def test_contiguous_runs_split_indices_into_consecutive_runs_in_order() -> None:
    assert contiguous_runs([3, 4, 6, 7, 8, 10]) == [[3, 4], [6, 7, 8], [10]]
    assert contiguous_runs([5, 4]) == [[5], [4]]
    assert contiguous_runs([]) == []


def _record_pred_writes(monkeypatch) -> list[int]:
    """Spy on every write to a prediction store's ``pred`` array: the sample indices written
    (one per chunk), in order."""
    writes: list[int] = []
    original = SampleStore.array

    def spy(self, name):
        arr = original(self, name)

        class Recorder:  # the array, with its chunk writes counted
            def __getattr__(self, key):
                return getattr(arr, key)

            def __setitem__(self, i, value):  # a sample index, or a slice of consecutive samples
                writes.extend(range(i.start, i.stop) if isinstance(i, slice) else [int(i)])
                arr[i] = value

        return Recorder() if name == "pred" else arr

    monkeypatch.setattr(SampleStore, "array", spy)
    return writes


def test_resume_writes_every_sample_exactly_once(tiny_synth, toy_runs, tmp_path: Path, monkeypatch) -> None:
    root, version = tiny_synth
    writes = _record_pred_writes(monkeypatch)
    out = tmp_path / "p.zarr"
    first = predict(toy_runs["pre"], str(root), version, out, device="cpu", num_workers=0, progress=False, limit=3)
    assert first.done_now == 3 and int((SampleStore.open(out, "bev_predictions").status() == DONE).sum()) == 3
    second = predict(toy_runs["pre"], str(root), version, out, device="cpu", num_workers=0, progress=False)
    assert second.already_done == 3 and second.done_now == 5
    assert sorted(writes) == list(range(8))  # each sample written once over both runs
    monkeypatch.undo()
    # and the resumed store equals an uninterrupted one (history rebuilt for the resumed chain)
    ref = tmp_path / "ref.zarr"
    predict(toy_runs["pre"], str(root), version, ref, device="cpu", num_workers=0, progress=False)
    a, b = _preds(out), _preds(ref)
    assert a.keys() == b.keys() and all(np.array_equal(a[t], b[t]) for t in a)
    third = predict(toy_runs["pre"], str(root), version, out, device="cpu", num_workers=0, progress=False)
    assert third.done_now == 0 and third.already_done == 8


def test_rerun_writes_only_the_samples_marked_todo_within_a_batch(tiny_synth, toy_runs, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Frame by frame, batch 4: samples 1 and 3 (one batch, not adjacent) marked todo again, as
    ``verify --repair`` does: the rerun writes exactly those two, with the same maps."""
    root, version = tiny_synth
    out = tmp_path / "p.zarr"
    predict(toy_runs["fin"], str(root), version, out, device="cpu", batch_size=4, num_workers=0, progress=False)
    before = _preds(out)
    SampleStore.open(out, "bev_predictions", mode="r+").mark([1, 3], TODO)
    writes = _record_pred_writes(monkeypatch)
    again = predict(toy_runs["fin"], str(root), version, out, device="cpu", batch_size=4, num_workers=0,
                    progress=False)
    monkeypatch.undo()
    assert again.already_done == 6 and again.done_now == 2 and sorted(writes) == [1, 3]
    after = _preds(out)
    assert all(np.array_equal(after[t], before[t]) for t in before)


def _other_class_set_checkpoint(src: Path, dst: Path) -> Path:
    ck = torch.load(src, weights_only=True)
    cfg = dataclasses.replace(TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"].items()}),
                              class_set="markings")
    ck["config"] = dataclass_to_dict(cfg)
    ck["model"] = build_model(cfg).state_dict()
    torch.save(ck, dst)
    return dst


def test_checkpoint_of_another_class_set(tiny_synth, toy_runs, tmp_path: Path, run_bevctl, capsys) -> None:
    root, version = tiny_synth
    other = _other_class_set_checkpoint(toy_runs["fin"], tmp_path / "markings.pt")
    out = tmp_path / "p.zarr"
    predict(other, str(root), version, out, split="val", device="cpu", num_workers=0, progress=False)
    store = PredictionStore.open(out)  # the store speaks the checkpoint's classes
    assert store.class_names == class_set_from_name("markings").names_with_background
    assert max(int(store.get(t).ids.max()) for t in store.tokens) < 6
    with pytest.raises(BevctlError, match="class_set"):
        PredictionStore.open(out, expected_classes=class_set_from_name("hdmapnet"))
    # resuming that store with a checkpoint of another class set: refused, nothing written
    assert run_bevctl("predict", "--checkpoint", str(toy_runs["fin"]), "--dataroot", str(root), "--version", version,
                      "--split", "val", "--out", str(out), "--device", "cpu", "--workers", "0") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--overwrite" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (["--split", "nosplit"], "no split 'nosplit'"),
    (["--split", "val", "--scenes", "scene-0001"], "at most one of"),
    (["--scenes", "scene-9"], "no scene 'scene-9'"),
    (["--samples", "nosuchtoken"], "no sample 'nosuchtoken'"),
    (["--samples", "scene-0001:x"], "got index 'x'"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "tpu"], "--device"),
])  # fmt: skip
def test_bad_input_is_one_error_line(tiny_synth, toy_runs, tmp_path: Path, run_bevctl, capsys, args, needle) -> None:
    root, version = tiny_synth
    out = tmp_path / "p.zarr"
    code = run_bevctl("predict", "--checkpoint", str(toy_runs["fin"]), "--dataroot", str(root), "--version", version,
                      "--out", str(out), "--workers", "0", *args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and needle in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_store_of_another_kind_is_refused(tiny_synth, toy_runs, tmp_path: Path) -> None:
    root, version = tiny_synth
    with pytest.raises(BevctlError, match="'bev_gt' store"):
        PredictionStore.open(toy_runs["gt"])
    with pytest.raises(BevctlError, match="expected a .bev_predictions. store"):
        predict(toy_runs["fin"], str(root), version, toy_runs["gt"], device="cpu", num_workers=0, progress=False)

