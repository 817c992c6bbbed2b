"""`bevctl predict` into object storage (the moto S3 server of tests/test_object_storage.py):
interrupted, resumed, read back; equal to the same prediction on a local disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bevctl.storage.predictions import PredictionStore
from bevctl.train.predict import predict

from test_object_storage import s3  # noqa: F401  (fixture: a bucket on a local moto server)
from test_predict import toy_runs  # noqa: F401  (fixture: toy checkpoints on the tiny world)


def _preds(path: str | Path) -> dict[str, np.ndarray]:
    store = PredictionStore.open(path)
    return {t: store.get(t).ids for t in store.tokens}


@pytest.mark.slow  # trains its own toy checkpoints (the fixture of test_predict.py is per module)
def test_predict_into_object_storage_and_resume(tiny_synth, toy_runs, s3: str, tmp_path: Path) -> None:  # noqa: F811
    root, version = tiny_synth
    local = tmp_path / "local.zarr"
    common = dict(scenes=["scene-0001"], device="cpu", num_workers=0, progress=False)
    predict(toy_runs["pre"], str(root), version, local, **common)
    url = f"{s3}/preds.zarr"
    first = predict(toy_runs["pre"], str(root), version, url, limit=2, **common)
    second = predict(toy_runs["pre"], str(root), version, url, **common)
    assert (first.done_now, second.already_done, second.done_now) == (2, 2, 2)
    a, b = _preds(url), _preds(local)
    assert a.keys() == b.keys() and all(np.array_equal(a[t], b[t]) for t in a)
    assert PredictionStore.open(url).get(next(iter(a))).history is False
