"""bevctl.train.build: a TrainConfig resolved once (presets or YAML files), its model built, and
a checkpoint loaded back into a ready model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bevctl.config import BEVGrid, grid_from_name
from bevctl.errors import BevctlError
from bevctl.train.build import build_model, load_trained_model, resolve
from bevctl.train.config import load_train_config
from bevctl.train.loop import RunSpec, train
from bevctl.train.model import BEVFormer, model_preset
from bevctl.train.model.backbone import normalize_images
from bevctl.train.toy import toy_dataset_factory

# half the demo grid's extent at 0.5 m: 32 x 16 cells (no preset has this shape)
SMALL_GRID = {"x_min": -8.0, "x_max": 8.0, "y_min": -4.0, "y_max": 4.0, "resolution": 0.5}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_grid_and_model_yaml_files_in_a_training_config_train_and_load_back(tmp_path: Path, monkeypatch) -> None:
    """`grid: g.yaml` in a training config used to pass load_train_config and then fail in the
    loop with `unknown BEV grid`; relative file names are stored absolute so the run travels."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    _write(conf_dir / "g.yaml", SMALL_GRID)
    _write(conf_dir / "train.yaml", {"model": "toy", "grid": "g.yaml", "batch_size": 2, "max_steps": 2,
                                     "num_workers": 0, "image_hw": [32, 56], "warmup_steps": 1})
    monkeypatch.chdir(conf_dir)
    cfg = load_train_config("train.yaml")
    assert cfg.grid == str(conf_dir / "g.yaml")
    setup = resolve(cfg)
    assert setup.grid == BEVGrid(**SMALL_GRID) and setup.grid.shape == (32, 16)
    assert setup.image_hw == (32, 56) and setup.model_config is None and setup.num_classes == 4

    run = tmp_path / "run"
    train(RunSpec(mode="finetune", cfg=cfg, run_dir=run, device="cpu", progress=False,
                  dataset_factory=toy_dataset_factory, extra={"n": 4}))
    monkeypatch.chdir(tmp_path)  # another directory: the saved config still finds g.yaml
    trained = load_trained_model(run)
    assert trained.setup.grid == BEVGrid(**SMALL_GRID) and trained.run["mode"] == "finetune"
    assert trained.path == str(run) and not trained.model.training
    images = torch.randint(0, 256, (1, 6, 3, 32, 56), dtype=torch.uint8)
    from bevctl.train.toy import default_rig

    pix, ego = (torch.from_numpy(a).float()[None] for a in default_rig((32, 56)))
    with torch.no_grad():
        assert trained.model(images, pix, ego).logits.shape == (1, 4, 32, 16)
    assert json.loads((run / "run.json").read_text())["num_classes"] == 4


def test_model_yaml_resolves_from_its_preset_with_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.yaml", {"preset": "demo", "embed_dim": 16, "num_heads": 2})
    cfg = load_train_config("demo", model=str(path))
    setup = resolve(cfg)
    assert setup.model_config.embed_dim == 16 and setup.image_hw == model_preset("demo").image_hw
    model = build_model(setup)
    assert isinstance(model, BEVFormer) and model.grid == grid_from_name("demo")
    # image_hw in the training config overrides the model's
    assert resolve(load_train_config("demo", model=str(path), image_hw=(64, 96))).image_hw == (64, 96)


def test_bad_grid_or_model_file_fails_when_the_config_loads(tmp_path: Path) -> None:
    with pytest.raises(BevctlError, match="config file not found"):
        load_train_config("toy", grid=str(tmp_path / "missing.yaml"))
    bad = _write(tmp_path / "bad.yaml", {"x_min": 0.0})
    with pytest.raises(BevctlError, match="bad.yaml"):
        load_train_config("toy", grid=str(bad))
    with pytest.raises(BevctlError, match="unknown BEV grid 'nope'"):
        load_train_config("toy", grid="nope")
    with pytest.raises(BevctlError, match="unknown model preset"):
        resolve(load_train_config("demo", model="huge"))


def test_load_trained_model_refuses_a_file_that_is_no_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BevctlError, match="junk.pt") as e:
        load_trained_model(junk)
    assert "weights_only" not in str(e.value) and "False" not in str(e.value)


def test_models_normalise_uint8_images_themselves() -> None:
    """Input normalisation has one place, the model: uint8 in == the normalised float in."""
    torch.manual_seed(0)
    for model in (build_model(load_train_config("demo")), build_model(load_train_config("toy"))):
        model.eval()
        h, w = resolve(load_train_config("demo" if isinstance(model, BEVFormer) else "toy")).image_hw
        images = torch.randint(0, 256, (1, 6, 3, h, w), dtype=torch.uint8)
        from bevctl.train.toy import default_rig

        pix, ego = (torch.from_numpy(a).float()[None] for a in default_rig((h, w)))
        with torch.no_grad():
            a = model(images, pix, ego).logits
            b = model(normalize_images(images), pix, ego).logits
        assert torch.equal(a, b)
        assert normalize_images(images).dtype == torch.float32
        assert abs(float(normalize_images(torch.full((3, 2, 2), 255, dtype=torch.uint8))[0, 0, 0]) - (1 - 0.485) / 0.229) < 1e-5
