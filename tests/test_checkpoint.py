"""Checkpoints: atomic step files + last.pt, pruning, safe loading with one-line errors, the
RNG state round trip that exact resume relies on, and loading a trained model for evaluation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bevctl.config import dataclass_to_dict
from bevctl.errors import BevctlError
from bevctl.train import checkpoint as ck
from bevctl.train.config import TrainConfig
from bevctl.train.build import build_model, load_trained_model


def test_save_writes_the_step_file_and_last_and_keeps_the_newest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (2, 4, 6, 8):
        path = ck.save_checkpoint(run, step, {"model": {"w": torch.full((2,), float(step))}, "config": {}, "step": step},
                                  keep=2)
        assert path == str(run / "checkpoints" / f"step_{step:07d}.pt")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000006.pt", "step_0000008.pt"]
    last = ck.load_checkpoint(run)  # a run directory means its last.pt
    assert last["step"] == 8 and torch.equal(last["model"]["w"], torch.full((2,), 8.0))
    assert ck.load_checkpoint(run / "checkpoints" / "step_0000006.pt")["step"] == 6
    assert not list(run.rglob("*.tmp"))
    ck.save_checkpoint(run, 10, {"model": {}, "config": {}}, keep=0)  # keep 0: nothing pruned
    assert len(list((run / "checkpoints").iterdir())) == 3


def test_load_refuses_missing_unreadable_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(BevctlError, match=rf"^checkpoint not found: {tmp_path / 'nope.pt'}$"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(BevctlError, match=rf"^checkpoint not found: {tmp_path / 'empty' / 'last.pt'}$"):
        (tmp_path / "empty").mkdir()
        ck.load_checkpoint(tmp_path / "empty")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(BevctlError, match=rf"^{junk}: not a readable bevctl checkpoint \(\w+"):
        ck.load_checkpoint(junk)
    for name, payload in (("nomodel.pt", {"config": {}}), ("noconfig.pt", {"model": {}}), ("list.pt", [1, 2])):
        torch.save(payload, tmp_path / name)
        with pytest.raises(BevctlError, match=rf"^{tmp_path / name}: not a bevctl checkpoint \(no model/config\)$"):
            ck.load_checkpoint(tmp_path / name)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "config": {}, "obj": Path("x")}, unsafe)  # not loadable with weights_only=True
    with pytest.raises(BevctlError, match="not a readable bevctl checkpoint"):
        ck.load_checkpoint(unsafe)


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    ck.save_checkpoint(tmp_path, 1, {"model": {}, "config": {}, "rng": ck.rng_state()})
    want = (torch.rand(3), np.random.standard_normal(3), np.random.rand(2), random.random(), random.getrandbits(64))
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ck.set_rng_state(ck.load_checkpoint(tmp_path)["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), np.random.rand(2), random.random(), random.getrandbits(64))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
    assert got[3:] == want[3:]


def test_load_trained_model_restores_weights_in_eval_mode(tmp_path: Path) -> None:
    cfg = TrainConfig(model="toy", grid="demo", image_hw=(32, 56))
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ck.save_checkpoint(tmp_path / "run", 5, {"model": state, "config": dataclass_to_dict(cfg), "step": 5,
                                             "run": {"mode": "finetune"}})
    trained = load_trained_model(tmp_path / "run", torch.device("cpu"))
    assert not trained.model.training and trained.cfg == cfg and trained.run == {"mode": "finetune"}
    for k, v in trained.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    del state[next(iter(state))]
    ck.save_checkpoint(tmp_path / "bad", 1, {"model": state, "config": dataclass_to_dict(cfg)})
    with pytest.raises(BevctlError, match=rf"^{tmp_path / 'bad'}: weights do not fit model 'toy' \(Error\(s\) in loading state_dict"):
        load_trained_model(tmp_path / "bad", torch.device("cpu"))
    foreign = {**dataclass_to_dict(cfg), "modle": "toy"}  # a checkpoint from another version, or edited
    ck.save_checkpoint(tmp_path / "odd", 1, {"model": {}, "config": foreign})
    with pytest.raises(BevctlError, match=rf"^{tmp_path / 'odd'}: config: unknown key\(s\) \['modle'\]"):
        load_trained_model(tmp_path / "odd", torch.device("cpu"))
