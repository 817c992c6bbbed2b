"""train-labeler: the recipe runs end to end (few steps), saves a loadable labeler, resumes from --init."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bevctl.errors import BevctlError
from bevctl.pseudolabel.labeler import load_labeler
from bevctl.pseudolabel.train_labeler import TrainLabelerConfig, find_pairs, run_train_labeler


@pytest.fixture(scope="module")
def one_sample_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bevctl.data.synth import SynthConfig, write_synthetic_dataset

    root = tmp_path_factory.mktemp("tl") / "data"
    write_synthetic_dataset(SynthConfig(scenes=1, samples_per_scene=1, image_hw=(90, 160), seed=3, workers=1), root,
                            progress=False)
    return root


def test_recipe_runs_saves_and_continues(one_sample_synth: Path, tmp_path: Path) -> None:
    pairs = find_pairs(one_sample_synth)
    assert len(pairs) == 6 and all(img.suffix == ".jpg" and gt.suffix == ".png" for img, gt in pairs)
    cfg = dataclasses.replace(TrainLabelerConfig(), steps=2, batch_size=2, warmup=1)
    out = tmp_path / "lab"
    m = run_train_labeler(out, tmp_path / "work", data=one_sample_synth, eval_data=one_sample_synth, cfg=cfg)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    saved = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert saved["images"] == 6 and set(saved["iou"]) == set(m["iou"]) and 0.0 <= saved["pixel_accuracy"] <= 1.0
    lab = load_labeler(str(out), device="cpu")
    assert lab.weights_hash == saved["weights_hash"]

    out2 = tmp_path / "lab2"
    m2 = run_train_labeler(out2, tmp_path / "work2", data=one_sample_synth, eval_data=one_sample_synth, cfg=cfg,
                           init=out)
    assert m2["init"] == str(out) and m2["weights_hash"] != saved["weights_hash"]
    with pytest.raises(BevctlError, match="nothing: no config.json"):
        run_train_labeler(tmp_path / "x", tmp_path / "w3", data=one_sample_synth, eval_data=one_sample_synth,
                          cfg=cfg, init=tmp_path / "nothing")


def test_find_pairs_names_a_gt_without_image(tmp_path: Path) -> None:
    (tmp_path / "semantic" / "samples" / "CAM_FRONT").mkdir(parents=True)
    (tmp_path / "semantic" / "samples" / "CAM_FRONT" / "a.png").write_bytes(b"")
    with pytest.raises(BevctlError, match="a.png: no camera image"):
        find_pairs(tmp_path)
