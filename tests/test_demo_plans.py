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
