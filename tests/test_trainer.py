"""Trainer mechanics with the stand-in model: exact resume, NaN guard, DDP equivalence, schedule."""

from __future__ import annotations

import json
import numpy as np
from pathlib import Path

import pytest
import torch

from bevctl.config import grid_from_name
from bevctl.errors import BevctlError
from bevctl.train.checkpoint import load_checkpoint
from bevctl.train.config import TrainConfig, load_train_config
from bevctl.train.loop import RunSpec, StepBatchSampler, lr_lambda, train
from bevctl.train.toy import toy_dataset_factory, toy_model_with_dropout


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
    cfg = _cfg(num_workers=1)
    drop = {"model_factory": toy_model_with_dropout}  # dropout: the RNG state must resume exactly too
    full = train(_spec(tmp_path / "full", cfg, **drop))
    # interrupted after step 3 (its last checkpoint is step 2: step 3 is redone on resume)
    train(_spec(tmp_path / "cut", cfg, stop_after_step=3, **drop))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 2
    with pytest.raises(BevctlError, match="--resume"):
        train(_spec(tmp_path / "cut", cfg, **drop))
    resumed = train(_spec(tmp_path / "cut", cfg, resume=True, **drop))
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
        train(_spec(tmp_path / "cut", _cfg(lr=1e-2, num_workers=1), resume=True, **drop))
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


# ---- on the synthetic world -------------------------------------------------------------------

from test_dataset import make_gt_store, make_label_store  # noqa: E402


def test_cli_pretrain_finetune_evaluate_visualize(tiny_synth, tmp_path: Path, capsys, run_bevctl) -> None:
    root, version = tiny_synth
    labels = make_label_store(root, version, tmp_path / "labels.zarr", resolution=(45, 80))
    gt = make_gt_store(root, version, tmp_path / "gt.zarr")
    cli = run_bevctl

    common = ["--dataroot", str(root), "--version", version, "--config", "toy", "--device", "cpu", "--workers", "1"]
    pre, fin = tmp_path / "pre", tmp_path / "fin"
    assert cli("pretrain", *common, "--labels", str(labels), "--out", str(pre), "--max-steps", "2",
               "--batch-size", "1") == 0
    ck = load_checkpoint(pre / "last.pt")
    assert ck["step"] == 2 and ck["run"]["labels"] == str(labels)
    no_config = [a for a in common if a not in ("--config", "toy")]  # --init brings the architecture
    assert cli("finetune", *no_config, "--gt", str(gt), "--init", str(pre / "last.pt"), "--fraction", "0.5",
               "--out", str(fin), "--max-steps", "2", "--batch-size", "1") == 0
    assert json.loads((fin / "scenes.json").read_text())["fraction"] == 0.5
    assert (fin / "config.yaml").is_file() and (fin / "metrics.jsonl").is_file()
    out = tmp_path / "eval.json"
    assert cli("evaluate", "--checkpoint", str(fin), "--dataroot", str(root), "--version", version, "--split", "val",
               "--gt", str(gt), "--out", str(out), "--device", "cpu", "--workers", "0") == 0
    res = json.loads(out.read_text())
    assert set(res["classes"]) == {"background", "boundary", "ped_crossing", "divider"}
    cells = sum(c["tp"] + c["fn"] for c in res["classes"].values())
    assert cells == res["num_samples"] * 128 * 64 and "argmax" in res["rules"]
    assert "mIoU" in out.with_suffix(".md").read_text() and "mIoU" in capsys.readouterr().out
    # per distance band: the demo grid's default edges 4, 8, 12 m; the bands partition the cells and
    # their confusion counts add up to the whole grid's
    assert [(b["min_m"], b["max_m"]) for b in res["by_range"]] == [(0, 4), (4, 8), (8, 12), (12, None)]
    assert sum(b["cells"] for b in res["by_range"]) == cells
    near = res["by_range"][0]
    assert near["cells"] % res["num_samples"] == 0 and 780 < near["cells"] / res["num_samples"] < 830  # ~pi 4^2 / 0.25^2
    assert "By distance from the ego" in out.with_suffix(".md").read_text()
    assert cli("evaluate", "--checkpoint", str(fin), "--dataroot", str(root), "--version", version, "--gt", str(gt),
               "--range-edges", "8,4", "--device", "cpu", "--workers", "0") == 2
    assert "increasing" in capsys.readouterr().err
    assert cli("evaluate", "--checkpoint", str(fin), "--dataroot", str(root), "--version", version,
               "--range-edges", "4m", "--device", "cpu", "--workers", "0") == 2
    assert "--range-edges" in capsys.readouterr().err
    assert res["temporal"] is False  # fine-tuned frame by frame
    from bevctl.train.evaluate import evaluate

    res_pre = evaluate(pre, str(root), version, "val", str(gt), device="cpu", num_workers=0, progress=False)
    assert res_pre["temporal"] is True and res_pre["num_samples"] == res["num_samples"]
    token = ck["run"] and json.loads((pre / "scenes.json").read_text())["scenes"][0]
    from bevctl.data.nuscenes import load_index

    sample = load_index(root, version).scenes[token][1]
    vis = tmp_path / "vis"
    assert cli("visualize", "--checkpoint", str(pre / "last.pt"), "--sample", sample, "--out", str(vis),
               "--device", "cpu") == 0
    from PIL import Image

    from bevctl import render

    zeros = np.zeros((128, 64), np.uint8)  # the demo grid; prediction + its error view + GT
    expected = render.bev_figure([render.BevMap("p", zeros, zeros), render.BevMap("g", zeros)],
                                 grid_from_name("demo"), ("background", "a", "b", "c"), "title").get_size_inches() * render.DPI
    assert Image.open(vis / "bev.png").size == tuple(int(round(v)) for v in expected)
    assert len(list(vis.glob("cam_*.png"))) == 6 and json.loads((vis / "legend.json").read_text())["pseudo_labels"]
    # user mistakes: one error line, exit code 2
    assert cli("evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--dataroot", str(root), "--version", version) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli("pretrain", *common, "--labels", str(labels), "--out", str(pre), "--max-steps", "2") == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_pretraining_on_perfect_pseudo_labels_beats_chance_without_bev_labels(small_synth, tmp_path: Path) -> None:
    """The demo BEVFormer pretrained only on image labels (synthetic image GT, reprojection +
    temporal loss) predicts BEV maps well above chance against the BEV GT it never saw."""
    from bevctl.train.evaluate import evaluate

    torch.set_num_threads(2)
    root, version = small_synth
    labels = make_label_store(root, version, tmp_path / "labels.zarr")
    gt = make_gt_store(root, version, tmp_path / "gt.zarr")
    cfg = TrainConfig(model="demo", grid="demo", batch_size=2, epochs=1000, max_steps=250, lr=2e-3,
                      warmup_steps=10, num_workers=1, temporal_weight=0.1, label_hw=(56, 100),
                      checkpoint_every=10**6)
    ckpt = train(RunSpec(mode="pretrain", cfg=cfg, run_dir=tmp_path / "run", dataroot=str(root), version=version,
                         labels=str(labels), device="cpu", progress=False))
    res = evaluate(ckpt, str(root), version, "train", str(gt), device="cpu", num_workers=0, progress=False)
    # chance: a predictor drawing classes by their GT frequency p has IoU p / (2 - p)
    total = sum(c["gt_cells"] for c in res["classes"].values())
    chance = np.mean([(c["gt_cells"] / total) / (2 - c["gt_cells"] / total)
                      for k, c in res["classes"].items() if k != "background"])
    assert res["miou"] > max(3 * chance, 0.06), (res["miou"], chance, res["classes"])
    assert res["classes"]["ped_crossing"]["iou"] > 0.15


def test_freeze_backbone_keeps_backbone_weights_and_batchnorm_statistics(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    pre = train(_spec(tmp_path / "pre", _cfg(model="demo", max_steps=2, num_workers=0)))
    cfg = _cfg(model="demo", max_steps=3, num_workers=0, freeze_backbone=True)
    fin = train(_spec(tmp_path / "fin", cfg, mode="finetune", init=str(pre)))
    a, b = _weights(pre), _weights(fin)
    backbone = [k for k in a if k.startswith("image_encoder.backbone.")]
    assert any("running_mean" in k for k in backbone) and any(k.endswith("weight") for k in backbone)
    assert all(torch.equal(a[k], b[k]) for k in backbone)  # weights and BatchNorm statistics
    rest = [k for k in a if k not in backbone and a[k].is_floating_point()]
    assert sum(not torch.equal(a[k], b[k]) for k in rest) > len(rest) // 2  # the rest of the model trained
    opt_params = sum(len(g["params"]) for g in load_checkpoint(fin)["optimizer"]["param_groups"])
    assert opt_params == sum(1 for k in rest if not k.endswith(("running_mean", "running_var")))
    with pytest.raises(BevctlError, match="freeze_backbone"):  # the stand-in model has no image backbone
        train(_spec(tmp_path / "toy", _cfg(freeze_backbone=True), mode="finetune"))
