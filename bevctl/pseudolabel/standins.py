"""Stand-in labelers with the :class:`~bevctl.pseudolabel.labeler.Labeler` interface, for tests,
ablations and benchmarks (``load_labeler`` resolves these names too):

``synth-gt``
    An oracle for the synthetic world: returns the image's ground-truth segmentation (the PNG
    that ``bevctl synth`` writes at ``<dataroot>/semantic/<image path>.png``), resized with
    nearest neighbour to the requested resolution. Perfect pseudo-labels in the synthetic
    world's class ids (:data:`bevctl.data.synth.SYNTH_CLASSES`). ``synth-gt:<seconds>`` also
    sleeps that long per batch (a slow oracle, for interrupting runs in tests).
``sleep:<seconds>``
    Sleeps a fixed time per batch and returns all-zero masks: an accelerator that costs no CPU,
    for scaling benchmarks.
``crash-once:<k>``
    ``synth-gt`` that kills its own process (``os._exit``) on its ``k``-th ``predict`` call
    (1-based), once per marker file: the first crash creates ``$BEVCTL_FAULT_MARKER`` (required)
    and later calls — also in the restarted actor — behave like ``synth-gt``. Tests actor restart.
``crash-every:<k>``
    ``synth-gt`` that kills its own process on every ``k``-th ``predict`` call of that process
    (k >= 2), so a restarted actor dies again after ``k - 1`` batches: an actor that keeps
    dying. Each crash appends a line to ``$BEVCTL_FAULT_MARKER`` when that is set.

Labelers that need the image file (the oracle) implement the optional hook
``preprocess_file(image, path)``; the job calls it instead of ``preprocess(image)`` when present.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bevctl.data.synth_world import SYNTH_CLASSES
from bevctl.errors import BevctlError

SYNTH_GT = "synth-gt"
SLEEP_PREFIX = "sleep:"
CRASH_PREFIX = "crash-once:"
CRASH_EVERY_PREFIX = "crash-every:"
FAULT_MARKER_ENV = "BEVCTL_FAULT_MARKER"


def _synth_classes() -> tuple[str, ...]:
    return tuple(SYNTH_CLASSES)


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def gt_path_for_image(image_path: str | Path) -> Path:
    """The synthetic world's GT PNG of an image: ``<root>/semantic/<path below root>.png`` for
    the nearest ancestor ``root`` that has such a file."""
    path = Path(image_path).resolve()
    for root in path.parents:
        candidate = root / "semantic" / path.relative_to(root).with_suffix(".png")
        if candidate.is_file():
            return candidate
    raise BevctlError(f"{image_path}: no ground-truth PNG under any '<root>/semantic/' (synth-gt needs a synthetic dataset)")


def _resize_nearest(mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    h, w = out_hw
    if mask.shape == (h, w):
        return np.ascontiguousarray(mask, dtype=np.uint8)
    return np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST), dtype=np.uint8)


class SynthGTLabeler:
    """Oracle: the synthetic world's image GT as pseudo-labels."""

    def __init__(self, delay: float = 0.0) -> None:
        classes = _synth_classes()
        self.delay = delay
        self.model_id = SYNTH_GT if delay == 0 else f"{SYNTH_GT}:{delay:g}"
        self.id2label = {i: name for i, name in enumerate(classes)}
        self.weights_hash = _hash(SYNTH_GT, *classes)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        raise BevctlError("synth-gt needs the image path: call preprocess_file(image, path)")

    def preprocess_file(self, image: np.ndarray, path: str) -> np.ndarray:
        """-> (H, W) uint8 GT mask of the image at ``path`` (the decoded ``image`` is unused)."""
        gt = gt_path_for_image(path)
        try:
            with Image.open(gt) as im:
                mask = np.asarray(im.convert("L") if im.mode not in ("L", "P") else im, dtype=np.uint8)
        except OSError as e:
            raise BevctlError(f"{gt}: unreadable ground-truth PNG ({e})") from None
        if mask.shape != image.shape[:2]:
            raise BevctlError(f"{gt}: GT is {mask.shape[1]}x{mask.shape[0]}, image is {image.shape[1]}x{image.shape[0]}")
        return mask

    def predict(
        self, batch: list[np.ndarray], out_hw: tuple[int, int], confidence: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if self.delay:
            time.sleep(self.delay)
        labels = np.stack([_resize_nearest(m, out_hw) for m in batch])  # (B, H, W)
        conf = np.full(labels.shape, 255, dtype=np.uint8) if confidence else None
        return labels, conf


class SleepLabeler:
    """Sleeps ``seconds`` per batch (no CPU), returns zeros: a stand-in accelerator."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.model_id = f"{SLEEP_PREFIX}{seconds:g}"
        self.id2label = {0: "background"}
        self.weights_hash = _hash(self.model_id)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return np.empty((0,), dtype=np.uint8)  # the model needs nothing from the pixels

    def predict(
        self, batch: list[np.ndarray], out_hw: tuple[int, int], confidence: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        time.sleep(self.seconds)
        labels = np.zeros((len(batch), *out_hw), dtype=np.uint8)
        return labels, (np.zeros_like(labels) if confidence else None)


class CrashOnceLabeler(SynthGTLabeler):
    """``synth-gt`` that hard-kills its process on the ``k``-th predict call, once."""

    def __init__(self, k: int, marker: Path) -> None:
        super().__init__()
        self.k = k
        self.marker = marker
        self.calls = 0
        self.model_id = f"{CRASH_PREFIX}{k}"

    def predict(
        self, batch: list[np.ndarray], out_hw: tuple[int, int], confidence: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        self.calls += 1
        if self.calls >= self.k:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, f"crashed pid {os.getpid()} on call {self.calls}\n".encode())
                os.close(fd)
                os._exit(17)  # a hard crash: no exception, no cleanup
        return super().predict(batch, out_hw, confidence)


class CrashEveryLabeler(SynthGTLabeler):
    """``synth-gt`` that hard-kills its process on every ``k``-th predict call."""

    def __init__(self, k: int, marker: Path | None) -> None:
        super().__init__()
        self.k = k
        self.marker = marker
        self.calls = 0
        self.model_id = f"{CRASH_EVERY_PREFIX}{k}"

    def predict(
        self, batch: list[np.ndarray], out_hw: tuple[int, int], confidence: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        self.calls += 1
        if self.calls % self.k == 0:
            if self.marker is not None:
                with open(self.marker, "a") as f:
                    f.write(f"crashed pid {os.getpid()} on call {self.calls}\n")
            os._exit(17)
        return super().predict(batch, out_hw, confidence)


def is_standin(model: str) -> bool:
    return model == SYNTH_GT or model.startswith((SYNTH_GT + ":", SLEEP_PREFIX, CRASH_PREFIX, CRASH_EVERY_PREFIX))


def _seconds(model: str, text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise BevctlError(f"model '{model}': expected a number of seconds >= 0 after ':'")
    return seconds


def load_standin(model: str) -> SynthGTLabeler | SleepLabeler:
    """The stand-in labeler named ``model`` (see the module docstring)."""
    if model == SYNTH_GT:
        return SynthGTLabeler()
    if model.startswith(SYNTH_GT + ":"):
        return SynthGTLabeler(_seconds(model, model[len(SYNTH_GT) + 1:]))
    if model.startswith(SLEEP_PREFIX):
        return SleepLabeler(_seconds(model, model[len(SLEEP_PREFIX):]))
    if model.startswith(CRASH_PREFIX):
        text = model[len(CRASH_PREFIX):]
        if not text.isdigit() or int(text) < 1:
            raise BevctlError(f"model '{model}': expected crash-once:<k> with k >= 1")
        marker = os.environ.get(FAULT_MARKER_ENV)
        if not marker:
            raise BevctlError(f"model '{model}': set {FAULT_MARKER_ENV} to a marker file path")
        return CrashOnceLabeler(int(text), Path(marker))
    if model.startswith(CRASH_EVERY_PREFIX):
        text = model[len(CRASH_EVERY_PREFIX):]
        if not text.isdigit() or int(text) < 2:
            raise BevctlError(f"model '{model}': expected crash-every:<k> with k >= 2")
        marker = os.environ.get(FAULT_MARKER_ENV)
        return CrashEveryLabeler(int(text), Path(marker) if marker else None)
    raise BevctlError(f"'{model}' is not a stand-in labeler "
                      "(synth-gt[:<s>], sleep:<s>, crash-once:<k>, crash-every:<k>)")
