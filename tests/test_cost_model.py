"""bench/cost_model.py computes docs/scaling.md's table from the committed benchmark results."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cost_model():
    spec = importlib.util.spec_from_file_location("cost_model", ROOT / "bench" / "cost_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cost_model_table_follows_from_its_inputs(cost_model) -> None:
    r = cost_model.compute()
    assert r["datasets_images"] == {"keyframes": 204_894, "with sweeps": 1_224_000}
    rows = {(x["data"], x["preset"], x["gpus"]): x for x in r["rows"]}
    assert len(rows) == 2 * 2 * 3
    a = {k: v.value for k, v in cost_model.ASSUMPTIONS.items()}
    m = r["measured"]
    # pseudolabel: images / (GPUs x img/s per GPU x measured efficiencies)
    eff = m["pipeline_efficiency"] * m["actor_scaling_efficiency_8"]
    want = 204_894 / (8 * a["labeler_img_s_per_gpu"] * eff) / 3600
    assert rows["keyframes", "small", 8]["hours"]["pseudolabel"] == pytest.approx(want)
    # sweeps cost 6x the keyframes (1,224,000 / 204,894) to label
    assert (rows["with sweeps", "small", 8]["hours"]["pseudolabel"]
            / rows["keyframes", "small", 8]["hours"]["pseudolabel"]) == pytest.approx(1_224_000 / 204_894)
    for preset in ("small", "base"):
        h8, h32, h128 = (rows["keyframes", preset, n]["hours"] for n in (8, 32, 128))
        assert h32["pseudolabel"] == pytest.approx(h8["pseudolabel"] / 4)
        # training: 4x the GPUs is a little less than 4x faster across nodes (exposed all-reduce)
        assert h8["pretrain"] / 4 < h32["pretrain"] < h8["pretrain"] / 3.5
        assert h128["pretrain"] == pytest.approx(h32["pretrain"] / 4)
        assert h8["evaluate"] == h128["evaluate"]  # one process
    # base costs more per sample than small, in proportion to its forward FLOPs
    sps = r["seconds_per_sample"]
    ratio = m["forward_gflop"]["base"] / m["forward_gflop"]["small"]
    assert sps["base"]["pretrain"] / sps["small"]["pretrain"] == pytest.approx(ratio)
    # store: every image has a mask and a confidence chunk
    assert r["stores"]["keyframes"]["label_chunk_files"] == 2 * 204_894
    per_image = r["bytes_per_image"]["mask"] + r["bytes_per_image"]["confidence"]
    assert r["stores"]["keyframes"]["labels_GB"] == pytest.approx(204_894 * per_image / 1e9)


def test_cost_model_markdown_has_every_section(cost_model) -> None:
    md = cost_model.to_markdown(cost_model.compute())
    assert "| keyframes | small | 8 |" in md and "## Limits" in md and "## Assumptions (not measured)" in md
    assert "204,894 keyframe camera images" in md


def test_cost_model_takes_the_gpu_check_figures_when_they_exist(cost_model, tmp_path) -> None:
    """A full bench/gpu_check.py run replaces the GPU assumptions; smoke runs are ignored."""
    ok = lambda result: {"status": "ok", "result": result}  # noqa: E731
    gpu = {"mode": "full", "env": {"gpu": "NVIDIA H200"}, "steps": {
        "labeler_mask2former": ok({"images_per_s": 20.0}),
        "pretrain_small": ok({"s_per_step": 0.5, "batch_size": 1}),
        "finetune_small": ok({"s_per_step": 0.3, "batch_size": 1}),
        "pretrain_base": {"status": "skipped: wall-clock budget"}}}
    path = tmp_path / "gpu.json"
    path.write_text(__import__("json").dumps(gpu))
    r = cost_model.compute(path)
    sps = r["seconds_per_sample"]
    assert sps["small"] == {"pretrain": 0.5, "finetune": 0.3, "evaluate": pytest.approx(0.1)}
    assert sps["base"] == cost_model.compute(tmp_path / "none.json")["seconds_per_sample"]["base"]  # still assumed
    row = next(x for x in r["rows"] if (x["data"], x["preset"], x["gpus"]) == ("keyframes", "small", 8))
    eff = r["measured"]["actor_scaling_efficiency_8"]
    assert row["hours"]["pseudolabel"] == pytest.approx(204_894 / (8 * 20.0 * eff) / 3600)
    assert "measured on one NVIDIA H200" in cost_model.to_markdown(r)
    path.write_text(__import__("json").dumps({**gpu, "mode": "smoke"}))
    assert cost_model.compute(path)["gpu_measured"] is None
