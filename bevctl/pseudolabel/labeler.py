"""Hugging Face Mask2Former as a semantic labeler for camera images.

``load_labeler(model)`` accepts

* ``"bevctl-synth"``: the small Mask2Former shipped inside the package
  (``bevctl/assets/labeler-synth``, trained on the synthetic world, see docs/labeler.md),
* a local directory in ``save_pretrained`` layout (config.json, model.safetensors,
  preprocessor_config.json),
* a Hugging Face hub id (used from the local cache when offline),
* a stand-in name registered in :mod:`bevctl.pseudolabel.standins` (``synth-gt``, ...).

Models are loaded with ``trust_remote_code=False``; a config that asks for remote code
(``auto_map``) is refused. The semantic map is computed at the requested output resolution
directly from the class and mask logits (softmax over the real classes, sigmoid of the mask
logits bilinearly upsampled to ``out_hw``, per-pixel einsum, argmax) rather than through
``post_process_semantic_segmentation``, which squeezes the masks through 384x384 and erases
thin road markings.

The pipeline contract (the Ray job relies on it)::

    pre = labeler.preprocess(image)            # HxWx3 uint8 RGB -> (3, h, w) float32, CPU
    labels, conf = labeler.predict([pre, ...], out_hw=(H, W), confidence=True)
    # labels uint8 (B, H, W) in labeler ids; conf uint8 (B, H, W) = round(255 * max prob)

``preprocess`` needs only the image processor, so :func:`load_preprocessor` gives the same
function without loading any weights (for decode workers that run ahead of the model).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.resources
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from bevctl.errors import BevctlError, one_line

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

SHIPPED_NAME = "bevctl-synth"
_SHIPPED_ASSET = "labeler-synth"
# Queries processed at once when combining masks at full output resolution: bounds memory to
# about chunk * H * W floats per image whatever the number of queries (200 for Mapillary models).
_QUERY_CHUNK = 32


@runtime_checkable
class Labeler(Protocol):
    model_id: str
    weights_hash: str
    id2label: dict[int, str]

    def preprocess(self, image: np.ndarray) -> np.ndarray: ...

    def predict(
        self, batch: list[np.ndarray], out_hw: tuple[int, int], confidence: bool
    ) -> tuple[np.ndarray, np.ndarray | None]: ...


# --------------------------------------------------------------------------------------------
# Resolving a model name to a local directory
# --------------------------------------------------------------------------------------------


def shipped_labeler_dir() -> Path:
    """The directory of the shipped synthetic-world labeler inside the installed package."""
    root = importlib.resources.files("bevctl") / "assets" / _SHIPPED_ASSET
    path = Path(str(root))
    if not (path / "config.json").is_file():
        raise BevctlError(
            f"the shipped labeler is missing from the package ({path}); "
            "rebuild it with `bevctl train-labeler --out bevctl/assets/labeler-synth`"
        )
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _resolve_hub(model: str) -> Path:
    """Download (or find in the cache) a hub model's config, weights and preprocessor."""
    hint = (f"pass a local directory with the model (save_pretrained layout) as --model, or --model {SHIPPED_NAME} "
            "(the labeler shipped for the synthetic world, offline)")
    if not _HUB_ID.match(model) or ".." in model:
        raise BevctlError(f"model '{model}' is neither a local directory nor a valid hub id; {hint}")
    try:
        from huggingface_hub import snapshot_download, try_to_load_from_cache  # noqa: PLC0415 - huggingface_hub: only to fetch a hub model
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise BevctlError(f"cannot load hub model '{model}': huggingface_hub is not installed; {hint}")
    cached = try_to_load_from_cache(model, "config.json")
    local_only = _offline() or isinstance(cached, str)
    patterns = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json"]
    try:
        path = snapshot_download(model, allow_patterns=patterns, local_files_only=local_only)
        if not any(Path(path).glob("*.safetensors")):  # older checkpoints: torch weights only
            patterns = patterns + ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
            path = snapshot_download(model, allow_patterns=patterns, local_files_only=local_only)
    except Exception as e:  # network errors, missing repo, not cached while offline
        if isinstance(cached, str):
            why = f"its local cache is incomplete ({type(e).__name__})"
        elif local_only:
            why = "not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
        else:
            why = f"not in the local Hugging Face cache and could not be downloaded ({type(e).__name__})"
        raise BevctlError(f"cannot load hub model '{model}': {why}; {hint}") from None
    return Path(path)


def resolve_model_dir(model: str) -> tuple[str, Path]:
    """``(model_id, directory)`` for a shipped name, a local directory or a hub id."""
    if model == SHIPPED_NAME:
        return SHIPPED_NAME, shipped_labeler_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve()), path.resolve()
    if path.exists():
        raise BevctlError(f"model path is not a directory: {model}")
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        raise BevctlError(f"model directory not found: {model}")
    return model, _resolve_hub(model)


def _read_config(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise BevctlError(f"{model_dir}: no config.json (expected a save_pretrained directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BevctlError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise BevctlError(f"{cfg_path}: expected a JSON object")
    if cfg.get("auto_map") or cfg.get("trust_remote_code"):
        raise BevctlError(
            f"{cfg_path}: the model asks for remote code (auto_map); bevctl only loads built-in "
            "transformers architectures (trust_remote_code=False)"
        )
    if cfg.get("model_type") != "mask2former":
        raise BevctlError(
            f"{cfg_path}: model_type is {cfg.get('model_type')!r}, expected 'mask2former'"
        )
    return cfg


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    return files or sorted(model_dir.glob("pytorch_model*.bin"))


def weights_hash(model_dir: Path) -> str:
    """sha256 over the model's weight file(s) in name order (names included): the safetensors
    files, or for old checkpoints without them the torch ``pytorch_model*.bin`` files."""
    files = _weight_files(model_dir)
    if not files:
        raise BevctlError(f"{model_dir}: no model weights (*.safetensors or pytorch_model.bin)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def state_dict_hash(state: dict[str, "torch.Tensor"]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (for models made in memory)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Preprocessing (no weights needed)
# --------------------------------------------------------------------------------------------


@dataclass
class Preprocessor:
    """``HxWx3 uint8 RGB -> (3, h, w) float32``, exactly as the model's image processor does it."""

    processor: Any

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            shape = getattr(image, "shape", None)
            raise BevctlError(f"labeler input must be an HxWx3 RGB image, got shape {shape}")
        if image.dtype != np.uint8:
            raise BevctlError(f"labeler input must be uint8, got {image.dtype}")
        out = self.processor(images=[image], return_tensors="np")["pixel_values"][0]
        return np.ascontiguousarray(out, dtype=np.float32)  # (3, h, w)


def _load_processor(model_dir: Path) -> Any:
    from transformers.models.mask2former.image_processing_pil_mask2former import (  # noqa: PLC0415 - transformers: seconds to import; only when a Mask2Former or a ResNet backbone is built
        Mask2FormerImageProcessorPil,
    )

    if not (model_dir / "preprocessor_config.json").is_file():
        raise BevctlError(f"{model_dir}: no preprocessor_config.json (the image processor settings)")
    path = model_dir / "preprocessor_config.json"
    try:
        processor = Mask2FormerImageProcessorPil.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise BevctlError(f"{path}: cannot load ({one_line(e)})") from None
    # transformers accepts some bad settings at load and fails on the first image: try one now,
    # so a bad file is one error line before any store is created, not a traceback mid-job
    try:
        processor(images=[np.zeros((64, 64, 3), np.uint8)], return_tensors="np")
    except Exception as e:
        raise BevctlError(f"{path}: the image processor it configures fails on a test image "
                          f"({type(e).__name__}: {one_line(e)})") from None
    return processor


def load_preprocessor(model: str) -> Preprocessor:
    """The labeler's ``preprocess`` without loading its weights (for decode workers)."""
    standin = _standin(model)
    if standin is not None:
        return standin.preprocess  # type: ignore[return-value]
    _, model_dir = resolve_model_dir(model)
    _read_config(model_dir)
    return Preprocessor(_load_processor(model_dir))


# --------------------------------------------------------------------------------------------
# Semantic maps from Mask2Former outputs
# --------------------------------------------------------------------------------------------


def semantic_from_logits(
    class_logits: "torch.Tensor",  # (B, Q, C+1), last = no-object
    mask_logits: "torch.Tensor",  # (B, Q, h, w)
    out_hw: tuple[int, int],
    confidence: bool,
    query_chunk: int = _QUERY_CHUNK,
) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Per-pixel class map at ``out_hw`` from class and mask logits (float32 math).

    ``scores[b, c, y, x] = sum_q softmax(class_logits)[b, q, c] * sigmoid(up(mask_logits))[b, q, y, x]``
    with ``up`` bilinear (align_corners=False) to ``out_hw`` and the no-object class dropped.
    Returns ``labels`` (B, H, W) int64 and, if asked, ``confidence`` (B, H, W) uint8 =
    round(255 * max_c scores / sum_c scores).
    """
    H, W = out_hw
    probs = class_logits.float().softmax(-1)[..., :-1]  # (B, Q, C)
    B, Q, C = probs.shape
    labels = torch.empty((B, H, W), dtype=torch.int64, device=probs.device)
    conf = torch.empty((B, H, W), dtype=torch.uint8, device=probs.device) if confidence else None
    for b in range(B):  # one image at a time bounds memory to (C + chunk) * H * W floats
        scores = torch.zeros((C, H, W), dtype=torch.float32, device=probs.device)
        for q0 in range(0, Q, query_chunk):
            m = mask_logits[b : b + 1, q0 : q0 + query_chunk].float()  # (1, q, h, w)
            m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)[0].sigmoid_()
            scores += torch.einsum("qc,qhw->chw", probs[b, q0 : q0 + query_chunk], m)
        best, idx = scores.max(0)  # (H, W)
        labels[b] = idx
        if conf is not None:
            total = scores.sum(0).clamp_min_(1e-12)
            conf[b] = (best / total * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return labels, conf


class HFMask2FormerLabeler:
    """A Mask2Former checkpoint (local directory) wrapped as a :class:`Labeler`."""

    def __init__(
        self, model_id: str, model_dir: Path, device: str = "auto", dtype: str = "auto"
    ) -> None:
        cfg = _read_config(model_dir)
        self.model_id = model_id
        self.model_dir = model_dir
        self.device = _pick_device(device)
        self.dtype = _pick_dtype(dtype, self.device)
        _set_threads(self.device)
        self._pre = Preprocessor(_load_processor(model_dir))
        self.weights_hash = weights_hash(model_dir)
        raw = cfg.get("id2label") or {}
        try:
            self.id2label = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise BevctlError(f"{model_dir}/config.json: id2label keys must be integers") from None
        if sorted(self.id2label) != list(range(len(self.id2label))) or not 0 < len(self.id2label) < 255:
            raise BevctlError(
                f"{model_dir}/config.json: id2label must number 1..254 classes as 0..N-1 "
                f"(uint8 masks, 255 reserved), got {len(self.id2label)} ids"
            )
        from transformers import Mask2FormerForUniversalSegmentation  # noqa: PLC0415 - transformers: seconds to import; only when a Mask2Former or a ResNet backbone is built

        try:
            with quiet_transformers():
                model = Mask2FormerForUniversalSegmentation.from_pretrained(
                    str(model_dir),
                    local_files_only=True,
                    trust_remote_code=False,
                    # torch .bin weights are read by transformers with torch.load(weights_only=True)
                    use_safetensors=_weight_files(model_dir)[0].suffix == ".safetensors",
                )
        except Exception as e:
            raise BevctlError(f"{model_dir}: cannot load Mask2Former weights ({e})") from None
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.num_classes = int(self.model.config.num_labels)
        if self.num_classes != len(self.id2label):
            raise BevctlError(
                f"{model_dir}/config.json: num_labels {self.num_classes} != {len(self.id2label)} id2label entries"
            )
        self._torch = torch

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return self._pre(image)

    def predict(
        self, batch: list[np.ndarray], out_hw: tuple[int, int], confidence: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        torch = self._torch
        if not batch:
            raise BevctlError("labeler.predict: empty batch")
        shapes = {tuple(x.shape) for x in batch}
        if len(shapes) != 1:
            # Different input sizes cannot share one forward pass: run them one by one.
            parts = [self.predict([x], out_hw, confidence) for x in batch]
            labels = np.concatenate([p[0] for p in parts])
            conf = np.concatenate([p[1] for p in parts]) if confidence else None  # type: ignore[misc]
            return labels, conf
        # Ray hands back read-only arrays: np.stack copies.
        pixels = torch.from_numpy(np.stack(batch)).to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            out = self.model(pixel_values=pixels)
            labels, conf = semantic_from_logits(
                out.class_queries_logits, out.masks_queries_logits, tuple(out_hw), confidence
            )
        labels_np = labels.to(torch.uint8).cpu().numpy()
        conf_np = conf.cpu().numpy() if conf is not None else None
        return labels_np, conf_np


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-tensor progress bars from transformers while loading or saving (they would
    flood the logs of every Ray actor)."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - transformers: seconds to import; only when a Mask2Former or a ResNet backbone is built

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BevctlError(f"device '{device}' requested but CUDA is not available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise BevctlError(f"unknown device '{device}' (auto, cpu, cuda, cuda:N)")
    return device


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _pick_dtype(dtype: str, device: str) -> "torch.dtype":
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    name = _DTYPES.get(dtype)
    if name is None:
        raise BevctlError(f"unknown dtype '{dtype}' (auto, float32, float16, bfloat16)")
    if device == "cpu" and name != "float32":
        raise BevctlError(f"dtype {name} is for GPUs; use float32 (or auto) on the CPU")
    return getattr(torch, name)


def _set_threads(device: str) -> None:
    """On the CPU follow OMP_NUM_THREADS (Ray sets it per actor) or use the cores we may run on;
    with a GPU a couple of threads are enough and leave the rest to decoding."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    n = int(env) if env.isdigit() and int(env) > 0 else cores
    if device.startswith("cuda"):
        n = min(n, 2)
    torch.set_num_threads(max(1, n))


def _standin(model: str) -> Any:
    """The stand-in labeler registered under ``model`` (bevctl.pseudolabel.standins), or None."""
    try:
        standins = importlib.import_module("bevctl.pseudolabel.standins")
    except ModuleNotFoundError as e:
        if e.name != "bevctl.pseudolabel.standins":
            raise
        return None
    if standins.is_standin(model):
        return standins.load_standin(model)
    return None


def load_labeler(model: str, device: str = "auto", dtype: str = "auto") -> Labeler:
    """A labeler by name: ``bevctl-synth``, a local directory, a hub id, or a stand-in name."""
    standin = _standin(model)
    if standin is not None:
        return standin
    model_id, model_dir = resolve_model_dir(model)
    return HFMask2FormerLabeler(model_id, model_dir, device=device, dtype=dtype)
