"""The demo's plans and the demo training preset keep the budget rule and fit the class set."""

from __future__ import annotations

import pytest

from bevctl.config import class_set_from_name
from bevctl.demo import PLANS
from bevctl.train.config import TRAIN_PRESETS, load_train_config


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_budget_rule(name: str) -> None:
    plan = PLANS[name]
    # pretrain + fine-tune together get at most half of the baseline's optimiser steps
    assert plan.pretrain_steps + plan.finetune_steps <= plan.baseline_steps / 2
    assert 0 < plan.fraction < 1
    # the stored labels are no larger than the images they come from
    assert plan.label_hw[0] <= plan.image_hw[0] and plan.label_hw[1] <= plan.image_hw[1]


@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
def test_preset_class_weights_match_class_set(preset: str) -> None:
    cfg = load_train_config(preset)
    if cfg.class_weights is None:
        return
    assert len(cfg.class_weights) == class_set_from_name(cfg.class_set).num_classes
    assert all(w > 0 for w in cfg.class_weights)


def test_demo_preset_upweights_markings() -> None:
    cw = load_train_config("demo").class_weights
    assert cw is not None and cw[0] == 1.0 and min(cw[1:]) > cw[0]


def test_train_phase_learning_rate_per_regime(tmp_path, monkeypatch) -> None:
    """pretrain_lr for pretraining, an explicit lr (fine-tuning) over it, ``lr`` / the preset otherwise."""
    import dataclasses

    import bevctl.demo as demo  # the trainer as the demo imports it
    from bevctl.demo import Paths, PhaseLog, train_phase

    seen: dict[str, float] = {}
    monkeypatch.setattr(demo, "train", lambda spec: seen.__setitem__(spec.run_dir.name, spec.cfg.lr))
    plan = dataclasses.replace(PLANS["paper"], pretrain_lr=6e-3, finetune_lr=2e-3, lr=None)
    paths, phases = Paths(tmp_path), PhaseLog(tmp_path / "phases.json")
    train_phase(plan, paths, phases, "pre", mode="pretrain", steps=4)
    train_phase(plan, paths, phases, "ft", mode="finetune", steps=4, fraction=0.5, lr=plan.finetune_lr)
    train_phase(plan, paths, phases, "scratch", mode="finetune", steps=4)
    train_phase(dataclasses.replace(plan, pretrain_lr=None, lr=5e-4), paths, phases, "pre2", mode="pretrain", steps=4)
    assert seen == {"pre": 6e-3, "ft": 2e-3, "scratch": load_train_config(plan.train_config).lr, "pre2": 5e-4}


def test_train_phase_label_adjacent_applies_to_pretraining_only(tmp_path, monkeypatch) -> None:
    import dataclasses

    import bevctl.demo as demo  # the trainer as the demo imports it
    from bevctl.demo import Paths, PhaseLog, train_phase

    seen: dict[str, int] = {}
    monkeypatch.setattr(demo, "train", lambda spec: seen.__setitem__(spec.run_dir.name, spec.cfg.label_adjacent))
    plan = dataclasses.replace(PLANS["paper"], label_adjacent=1)
    paths, phases = Paths(tmp_path), PhaseLog(tmp_path / "phases.json")
    train_phase(plan, paths, phases, "pre", mode="pretrain", steps=4)
    train_phase(plan, paths, phases, "pre-own", mode="pretrain", steps=4, label_adjacent=0)  # an ablation
    train_phase(plan, paths, phases, "ft", mode="finetune", steps=4, fraction=0.5)
    assert seen == {"pre": 1, "pre-own": 0, "ft": 0}
