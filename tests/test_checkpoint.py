"""Checkpoints: atomic step files + last.pt, pruning, safe loading with one-line errors, the
RNG state round trip that exact resume relies on, and loading a trained model for evaluation."""

from __future__ import annotations

import pickle
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


def _reason(path: Path) -> str:
    """The parenthesised reason of load_checkpoint's one-line error for an unreadable file."""
    with pytest.raises(BevctlError) as info:
        ck.load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not a readable bevctl checkpoint (") and msg.endswith(")"), msg
    assert "\n" not in msg
    return msg[len(f"{path}: not a readable bevctl checkpoint ("):-1]


SAFE = "not a torch file of tensors and plain values; bevctl loads checkpoints safely and refuses any other Python object"


def test_unreadable_files_get_a_reason_per_kind_of_damage(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(64)}, "config": {}}, good)
    data = good.read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])  # an interrupted copy
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert _reason(tmp_path / "half.pt") == "truncated or not a torch file"
    assert _reason(tmp_path / "empty.pt") == "truncated or not a torch file"
    assert _reason(tmp_path / "junk.pt") == SAFE
    torch.save({"model": {}, "config": {}, "obj": Path("x")}, tmp_path / "unsafe.pt")
    assert _reason(tmp_path / "unsafe.pt") == SAFE
    # a zip archive that is not a torch file: torch's error type and the first line of its message
    import zipfile

    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:
        z.writestr("notes.txt", "hello")
    why = _reason(tmp_path / "zip.pt")
    assert why.startswith("RuntimeError: ") and "notes.txt" in why


def test_unreadable_reason_never_suggests_unsafe_loading_and_keeps_one_short_line() -> None:
    advice = "Weights only load failed.\nRe-running `torch.load` with `weights_only` set to `False` will likely succeed"
    for e in (pickle.UnpicklingError("invalid load key, 'x'."), pickle.UnpicklingError(advice),
              RuntimeError(advice), ValueError("bad\nweights_only=False")):
        assert ck._why_unreadable(e) == SAFE, e
    assert ck._why_unreadable(ValueError("")) == "ValueError: "
    assert ck._why_unreadable(RuntimeError("  first line\nsecond line")) == "RuntimeError: first line"
    long = "x" * 500
    assert ck._why_unreadable(OSError(long)) == "OSError: " + "x" * 160  # torch's message quoted, cut short


def test_loading_refuses_unsafe_pickles_even_when_torch_defaults_to_unsafe(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load's default becomes weights_only=False
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "config": {}, "obj": Path("x")}, unsafe)
    assert _reason(unsafe) == SAFE


def test_load_honours_map_location(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(3)}, "config": {}})
    assert ck.load_checkpoint(tmp_path)["model"]["w"].device.type == "cpu"
    assert ck.load_checkpoint(tmp_path, map_location="meta")["model"]["w"].device.type == "meta"


def test_checkpoints_round_trip_through_object_storage() -> None:
    run = "memory://bevctl-test-checkpoint/run"
    for step in (1, 2, 3):
        ck.save_checkpoint(run, step, {"model": {"w": torch.full((2,), float(step))}, "config": {}, "step": step},
                           keep=2)
    last = ck.load_checkpoint(run)
    assert last["step"] == 3 and torch.equal(last["model"]["w"], torch.full((2,), 3.0))
    assert ck.load_checkpoint(run + "/checkpoints/step_0000002.pt")["step"] == 2
    with pytest.raises(BevctlError, match="checkpoint not found"):
        ck.load_checkpoint(run + "/checkpoints/step_0000001.pt")  # pruned


def test_pruning_keeps_the_newest_and_only_touches_step_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"a user's own file")
    (run / "checkpoints" / "step_notes.txt").write_bytes(b"another one")
    for step in (1, 2, 3):
        ck.save_checkpoint(run, step, {"model": {}, "config": {}, "step": step}, keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "step_0000003.pt", "step_notes.txt"]
    # without keep: as many as the training config keeps by default
    for step in range(4, 10):
        ck.save_checkpoint(run, step, {"model": {}, "config": {}, "step": step})
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))
    assert steps == [f"step_{s:07d}.pt" for s in range(10 - TrainConfig().keep_checkpoints, 10)]


def test_rng_state_saves_and_restores_the_cuda_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with GPUs (simulated) the CUDA generators' states travel with the checkpoint."""
    cuda_states = [torch.arange(4, dtype=torch.uint8), torch.arange(4, 8, dtype=torch.uint8)]
    restored: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in cuda_states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(states))
    state = ck.rng_state()
    ck.set_rng_state(state)
    assert len(restored) == 1 and [torch.equal(a, b) for a, b in zip(restored[0], cuda_states)] == [True, True]
    restored.clear()
    cpu_state = {k: v for k, v in state.items() if k != "cuda"}  # saved on a machine without a GPU
    ck.set_rng_state(cpu_state)
    assert restored == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU run resumed without a GPU
    ck.set_rng_state(state)
    assert restored == []
