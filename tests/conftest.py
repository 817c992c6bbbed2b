"""Shared pytest fixtures: small synthetic nuScenes-format datasets (built once per session).

``tiny_synth``  -> (dataroot, version): 2 scenes x 4 keyframes, 90x160 images (~1 s to build).
``small_synth`` -> (dataroot, version): 4 scenes x 8 keyframes, 112x200 images (~3 s).
Both are read-only for tests: copy them before modifying anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLCONFIGDIR", "/tmp/bevctl-mpl")


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, **kw) -> tuple[Path, str]:
    from bevctl.data.synth import SynthConfig, write_synthetic_dataset

    cfg = SynthConfig(workers=1, **kw)
    root = tmp_path_factory.mktemp(name) / "data"
    write_synthetic_dataset(cfg, root, progress=False)
    return root, cfg.version


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _build(tmp_path_factory, "tiny_synth", scenes=2, samples_per_scene=4, image_hw=(90, 160), seed=0)


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _build(tmp_path_factory, "small_synth", scenes=4, samples_per_scene=8, image_hw=(112, 200), seed=1)


@pytest.fixture
def run_bevctl(monkeypatch: pytest.MonkeyPatch):
    """``run_bevctl(*args) -> exit code``: ``bevctl ARGS`` in this process (so the test's
    monkeypatches apply), through ``bevctl.cli.main`` and its error handling."""
    from bevctl.cli import main

    def run(*args: str) -> int:
        monkeypatch.setattr("sys.argv", ["bevctl", *args])
        try:
            main()
            return 0
        except SystemExit as e:
            return int(e.code or 0)

    return run
