"""Trainer mechanics with the stand-in model: exact resume, NaN guard, DDP equivalence, schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bevctl.errors import BevctlError
from bevctl.train.checkpoint import load_checkpoint
from bevctl.train.config import TrainConfig, load_train_config
from bevctl.train.loop import RunSpec, StepBatchSampler, lr_lambda, train
from bevctl.train.toy import toy_dataset_factory


def _cfg(**kw) -> TrainConfig:
    base = dict(model="toy", grid="demo", image_hw=(32, 56), batch_size=2, epochs=3, max_steps=5, lr=3e-3,
                warmup_steps=2, checkpoint_every=2, num_workers=0, temporal_weight=0.5, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _spec(run: Path, cfg: TrainConfig, **kw) -> RunSpec:
    kw.setdefault("extra", {"n": 8})
    return RunSpec(mode=kw.pop("mode", "pretrain"), cfg=cfg, run_dir=run, device="cpu", progress=False,
                   dataset_factory=toy_dataset_factory, **kw)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = _cfg()
    full = train(_spec(tmp_path / "full", cfg))
    # interrupted after step 3 (its last checkpoint is step 2: step 3 is redone on resume)
    train(_spec(tmp_path / "cut", cfg, stop_after_step=3))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 2
    with pytest.raises(BevctlError, match="--resume"):
        train(_spec(tmp_path / "cut", cfg))
    resumed = train(_spec(tmp_path / "cut", cfg, resume=True))
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = load_checkpoint(full), load_checkpoint(resumed)
    assert ca["step"] == cb["step"] == 5 and ca["bevctl_version"]
    assert ca["optimizer"]["state"][0]["step"] == cb["optimizer"]["state"][0]["step"]
    # metrics: one line per step, none duplicated by the resume, losses identical
    rows_a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert {"reproj", "temporal", "t_data", "t_fwd", "t_loss", "t_bwd", "t_opt", "pred_entropy"} <= rows_a[0].keys()
    # a changed option is refused on resume
    with pytest.raises(BevctlError, match="lr"):
        train(_spec(tmp_path / "cut", _cfg(lr=1e-2), resume=True))
    # training did something: weights moved from the initialisation and the loss went down
    assert rows_a[-1]["reproj"] < rows_a[0]["reproj"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = _cfg(epochs=1, max_steps=0, checkpoint_every=1, batch_size=1)
    # find the step at which sample 5 is consumed (epoch 0 permutation of the sampler)
    order = [b[0] for b in StepBatchSampler(8, 1, 1, 0, 1, cfg.seed, 0, 8)]
    bad_step = order.index(5) + 1
    run = tmp_path / "nan"
    with pytest.raises(BevctlError, match=r"non-finite loss .* at step %d" % bad_step) as e:
        train(_spec(run, cfg, extra={"n": 8, "nan_at": 5}))
    if bad_step > 1:
        assert f"step {bad_step - 1})" in str(e.value)
        ck = load_checkpoint(run / "last.pt")
        assert ck["step"] == bad_step - 1
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    else:
        assert not (run / "last.pt").exists()


def test_ddp_two_gloo_processes_match_one_process_on_the_combined_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    one = train(_spec(tmp_path / "one", _cfg(batch_size=4, max_steps=3, epochs=1)))
    two = train(_spec(tmp_path / "two", _cfg(batch_size=2, max_steps=3, epochs=1), gpus=2))
    a, b = _weights(one), _weights(two)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert load_checkpoint(two)["run"]["world"] == 2
    # and accumulation: 1 process x batch 2 x 2 micro-batches == batch 4
    acc = train(_spec(tmp_path / "acc", _cfg(batch_size=2, grad_accum=2, max_steps=3, epochs=1)))
    c = _weights(acc)
    for k in a:
        assert torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-6), k


def test_sampler_partitions_each_global_batch_across_ranks() -> None:
    full = list(StepBatchSampler(10, 4, 1, 0, 1, seed=1, start_step=0, total_steps=4))
    r0 = list(StepBatchSampler(10, 2, 2, 0, 1, seed=1, start_step=0, total_steps=4))
    r1 = list(StepBatchSampler(10, 2, 2, 1, 1, seed=1, start_step=0, total_steps=4))
    assert [sorted(a + b) for a, b in zip(r0, r1)] == [sorted(x) for x in full]
    # 10 samples / global batch 4: 2 steps per epoch, epochs differ, each epoch has no repeats
    assert len(set(full[0] + full[1])) == 8 and full[:2] != full[2:4]
    # resuming at step 3 yields exactly the tail
    assert list(StepBatchSampler(10, 4, 1, 0, 1, 1, 3, 4)) == full[3:]


def test_lr_schedule_warmup_then_cosine() -> None:
    f = lr_lambda(100, 10, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)
    assert f(100) == pytest.approx(0.1) and all(f(s) >= f(s + 1) - 1e-12 for s in range(10, 100))


def test_train_config_presets_and_errors(tmp_path: Path) -> None:
    cfg = load_train_config("toy", max_steps=7, seed=None)
    assert cfg.model == "toy" and cfg.max_steps == 7
    y = tmp_path / "c.yaml"
    y.write_text("model: toy\nlabel_hw: [45, 80]\ntemporal_weight: 0.3\n")
    assert load_train_config(str(y)).label_hw == (45, 80)
    y.write_text("modle: toy\n")
    with pytest.raises(BevctlError, match="modle"):
        load_train_config(str(y))
    with pytest.raises(BevctlError, match="fraction"):
        TrainConfig(fraction=1.5)
    with pytest.raises(BevctlError, match="neither a preset"):
        load_train_config("nope")
