"""``bevctl demo``: the whole method on the embedded synthetic world, offline, on a CPU.

Phases run in order; each one records its completion and wall time in ``OUT/phases.json``
(written atomically), so rerunning after an interruption skips finished phases and the long
phases resume from their own checkpoints/stores.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bevctl.io import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    scenes: int
    samples_per_scene: int
    image_hw: tuple[int, int]


DEMO_SIZES = {
    "default": DemoSize(scenes=10, samples_per_scene=20, image_hw=(225, 400)),
    "quick": DemoSize(scenes=4, samples_per_scene=10, image_hw=(112, 200)),
}

VERSION = "v1.0-synth"


class PhaseLog:
    """Completion and wall time of each phase, persisted in ``OUT/phases.json``."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, fn: Callable[[], None]) -> float:
        if self.data.get(name, {}).get("done"):
            log.info("demo: phase %s already done (%.1f s), skipping", name, self.data[name]["wall_seconds"])
            return float(self.data[name]["wall_seconds"])
        log.info("demo: phase %s ...", name)
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start + self.data.get(name, {}).get("partial_seconds", 0.0)
        self.data[name] = {"done": True, "wall_seconds": elapsed}
        atomic_write_text(self.path, json.dumps(self.data, indent=2))
        return elapsed


def run_demo(out: Path, quick: bool = False) -> None:
    from bevctl.data.nuscenes import load_index
    from bevctl.data.synth import SynthConfig, write_synthetic_dataset

    size = DEMO_SIZES["quick" if quick else "default"]
    out.mkdir(parents=True, exist_ok=True)
    phases = PhaseLog(out / "phases.json")
    dataroot = out / "synth"

    def synth() -> None:
        cfg = SynthConfig(
            scenes=size.scenes,
            samples_per_scene=size.samples_per_scene,
            image_hw=size.image_hw,
            seed=0,
            version=VERSION,
        )
        write_synthetic_dataset(cfg, dataroot, overwrite=True)

    phases.run("synth", synth)
    index = load_index(dataroot, VERSION)
    print(f"synthetic nuScenes-format dataset: {dataroot} (version {VERSION})")
    for split, scenes in index.split_scenes.items():
        n = len(index.samples_in(split))
        print(f"  {split}: {len(scenes)} scenes, {n} keyframes, {6 * n} camera images")
    print(f"  image ground truth: {dataroot / 'semantic'}")
    print(f"  map expansion: {dataroot / 'maps' / 'expansion'}")
