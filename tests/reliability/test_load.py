"""Load: ``bevctl pseudolabel`` (real CLI, Ray, the fast ``synth-gt`` stand-in) over a synthetic
dataset of 1,680 samples = 10,080 camera images, and over one a quarter of that size.

Asserted: every sample is done exactly once (the done array is all DONE, the store's tokens are
unique and are the dataset's, the job labelled 6 images per sample, no more), and the driver's
memory stays flat: its RSS grows by less than 50 MB and 15% between 25% and 100% progress, and
its peak over the 4x larger dataset is within 25% (+50 MB) of the peak over the small one.
The numbers (seconds, images/s, RSS at each point) are written by ``bench/bench_load.py``
(the same measurement), never asserted on here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "bench_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.slow
def test_pseudolabel_over_10k_images_memory_flat_exactly_once(tmp_path: Path) -> None:
    from bevctl.data.nuscenes import load_index
    from bevctl.storage.labels import LabelStore

    bench = _bench()
    result = bench.measure(tmp_path, 1680, (18, 32))
    small, large = result["runs"]
    assert large["images"] >= 10_000 and small["samples"] * 4 == large["samples"]
    for run in (small, large):
        store = LabelStore.open(run["store"])
        index = load_index(Path(run["store"]).parent / f"data_{run['samples']}", "v1.0-synth")
        assert run["samples_done"] == run["samples"] == len(index.samples)
        assert run["images"] == 6 * run["samples"]  # no image labelled twice
        assert np.all(store.statuses() == 1)
        assert len(set(store.tokens)) == len(store.tokens) and set(store.tokens) == set(index.samples)
        assert run["ticks"] >= 8  # the sampler saw the run, not only its end
        d25, d100 = run["rss_mb_driver_actors"]["25%"][0], run["rss_mb_driver_actors"]["100%"][0]
        assert d100 - d25 < 50 and d100 < 1.15 * d25, run
    assert large["peak_driver_mb"] < 1.25 * small["peak_driver_mb"] + 50, result
