"""Train the small Mask2Former shipped for the synthetic world (``bevctl-synth``).

Train one from scratch (CPU, 1 thread, ~25 minutes of training)::

    bevctl train-labeler --out DIR

which writes two synthetic datasets into ``--work`` (default ``.cache/train-labeler``), one to
train on (seed 101) and a held-out one with other scenes and another world (seed 202), trains
a Swin-tiny-ish Mask2Former from scratch with the Mask2Former loss (transformers computes it
from ``mask_labels`` / ``class_labels``), evaluates per-class image IoU on the held-out world
with exactly the inference path of :mod:`bevctl.pseudolabel.labeler`, and saves
``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` into ``--out`` plus
``metrics.json`` in ``--work``. ``--init DIR`` continues from an earlier run's weights (with
``--lr``/``--steps``/``--seed``): the shipped weights are that command (on the world before the
curb change c159eab) followed by ``--init <it> --lr 3e-4 --steps 4000 --seed 1`` on the current
world; held-out IoU lane marking 0.39, road divider marking 0.73, crosswalk 0.56, curb 0.51,
mIoU 0.670 (the exact sequence: docs/labeler.md, docs/labeler_metrics.json).

Everything is seeded (data order, crops, augmentation, loss point sampling); the same command on
the same machine and package versions should give the same weights, though a bit-for-bit rerun
was not verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import bevctl.data.synth as synth_mod
from bevctl.data.synth import SynthConfig, write_synthetic_dataset
from bevctl.errors import BevctlError
from bevctl.pseudolabel.labeler import HFMask2FormerLabeler, _read_config, quiet_transformers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelerModelConfig:
    """A small Mask2Former: Swin backbone (embed 32), thin pixel decoder, few queries."""

    embed_dim: int = 32
    patch_size: int = 2  # stride-2 stem: masks at 1/2 input resolution, so 2-3 px markings survive
    depths: tuple[int, ...] = (1, 1, 2, 1)
    num_heads: tuple[int, ...] = (1, 2, 4, 8)
    window_size: int = 7
    hidden_dim: int = 64
    encoder_layers: int = 1
    decoder_layers: int = 2
    num_queries: int = 16
    shortest_edge: int = 224  # model input: images are resized so that their short side is this


@dataclass(frozen=True)
class TrainLabelerConfig:
    steps: int = 2500
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    seed: int = 0
    threads: int = 1  # on a shared CPU, 2 OpenMP threads ran >10x slower than 1 (spinning)
    train_points: int = 2048  # points per mask for the loss (transformers default 12544; crops are small)
    crop_hw: tuple[int, int] | None = (96, 160)  # training crops of the processed image (None: whole)
    model: LabelerModelConfig = field(default_factory=LabelerModelConfig)


# --------------------------------------------------------------------------------------------
# Data: (image, GT) pairs of a synthetic dataset
# --------------------------------------------------------------------------------------------


def synth_class_names(root: Path) -> list[str]:
    path = root / "semantic" / "classes.json"
    if not path.is_file():
        raise BevctlError(f"{path}: missing (not a synthetic dataset with image ground truth?)")
    try:
        names = json.loads(path.read_text())["classes"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise BevctlError(f"{path}: unreadable class list ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BevctlError(f"{path}: 'classes' must be a list of names")
    return names


def find_pairs(root: Path) -> list[tuple[Path, Path]]:
    """``(image, gt_png)`` for every GT under ``root/semantic`` (GT path = image path with .png)."""
    sem = root / "semantic"
    pairs = []
    for gt in sorted(sem.rglob("*.png")):
        rel = gt.relative_to(sem)
        candidates = [root / rel.with_suffix(s) for s in (".jpg", ".jpeg", ".JPG", ".png")]
        candidates.append(root / rel.with_suffix(""))  # "<image>.jpg.png"
        image = next((c for c in candidates if c.is_file()), None)
        if image is None:
            raise BevctlError(f"{gt}: no camera image next to this ground truth (looked for {rel.with_suffix('.jpg')})")
        pairs.append((image, gt))
    if not pairs:
        raise BevctlError(f"{sem}: no ground-truth PNGs")
    return pairs


def _read_pair(image: Path, gt: Path) -> tuple[np.ndarray, np.ndarray]:
    with Image.open(image) as im:
        rgb = np.asarray(im.convert("RGB"))
    with Image.open(gt) as g:
        lab = np.asarray(g)
    if lab.ndim != 2 or lab.shape != rgb.shape[:2]:
        raise BevctlError(f"{gt}: ground truth shape {lab.shape} does not match image {rgb.shape[:2]}")
    return rgb, lab


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_model(class_names: list[str], cfg: LabelerModelConfig, train_points: int = 12544) -> tuple[Any, Any]:
    """A fresh Mask2Former and its image processor (PIL backend)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig  # noqa: PLC0415 - transformers: seconds to import; only when a Mask2Former or a ResNet backbone is built
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil  # noqa: PLC0415 - transformers: seconds to import; only when a Mask2Former or a ResNet backbone is built

    swin = SwinConfig(
        embed_dim=cfg.embed_dim,
        depths=list(cfg.depths),
        num_heads=list(cfg.num_heads),
        window_size=cfg.window_size,
        patch_size=cfg.patch_size,
        drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    m2f = Mask2FormerConfig(
        backbone_config=swin,
        feature_size=cfg.hidden_dim,
        mask_feature_size=cfg.hidden_dim,
        hidden_dim=cfg.hidden_dim,
        encoder_feedforward_dim=cfg.hidden_dim * 4,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        num_attention_heads=4,
        dim_feedforward=cfg.hidden_dim * 4,
        num_queries=cfg.num_queries,
        train_num_points=train_points,  # read once, when the loss module is built
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={n: i for i, n in enumerate(class_names)},
    )
    model = Mask2FormerForUniversalSegmentation(m2f)
    processor = Mask2FormerImageProcessorPil(
        size={"shortest_edge": cfg.shortest_edge, "longest_edge": 4 * cfg.shortest_edge}, size_divisor=32
    )
    return model, processor


def _crop_origin(lab: np.ndarray, crop_hw: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """Top-left of a crop: centred on a pixel of a class drawn uniformly among those present
    (class-balanced: thin markings are seen as often as the sky), else uniform."""
    h, w = lab.shape
    ch, cw = min(crop_hw[0], h), min(crop_hw[1], w)
    if rng.random() < 0.75:
        present = np.unique(lab)
        ys, xs = np.nonzero(lab == rng.choice(present))
        k = int(rng.integers(len(ys)))
        y0 = int(ys[k]) - ch // 2 + int(rng.integers(-ch // 4, ch // 4 + 1))
        x0 = int(xs[k]) - cw // 2 + int(rng.integers(-cw // 4, cw // 4 + 1))
    else:
        y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    return int(np.clip(y0, 0, h - ch)), int(np.clip(x0, 0, w - cw))


def _make_batch(
    pairs: list[tuple[Path, Path]],
    processor: Any,
    rng: np.random.Generator,
    num_classes: int,
    crop_hw: tuple[int, int] | None,
) -> dict[str, Any]:
    """Pixel values plus per-image binary masks/classes (one mask per class present: semantic).
    Images go through the model's own image processor (exactly as at inference), then a crop."""
    pix, masks, classes = [], [], []
    for image, gt in pairs:
        rgb, lab = _read_pair(image, gt)
        if rng.random() < 0.5:  # horizontal flip: the classes are mirror-symmetric
            rgb, lab = rgb[:, ::-1], lab[:, ::-1]
        gain = rng.uniform(0.75, 1.25)
        bias = rng.uniform(-20, 20)
        rgb = np.clip(rgb.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
        pv = processor(images=[np.ascontiguousarray(rgb)], return_tensors="np")["pixel_values"][0]
        h, w = pv.shape[-2:]
        lab_r = np.asarray(Image.fromarray(np.ascontiguousarray(lab)).resize((w, h), Image.NEAREST))
        if crop_hw is not None:
            y0, x0 = _crop_origin(lab_r, crop_hw, rng)
            ch, cw = min(crop_hw[0], h), min(crop_hw[1], w)
            pv, lab_r = pv[:, y0 : y0 + ch, x0 : x0 + cw], lab_r[y0 : y0 + ch, x0 : x0 + cw]
        present = [c for c in np.unique(lab_r).tolist() if c < num_classes]
        pix.append(torch.from_numpy(np.ascontiguousarray(pv)))
        masks.append(torch.from_numpy(np.stack([lab_r == c for c in present]).astype(np.float32)))
        classes.append(torch.tensor(present, dtype=torch.int64))
    return {"pixel_values": torch.stack(pix), "mask_labels": masks, "class_labels": classes}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_labeler(
    labeler: Any, pairs: list[tuple[Path, Path]], class_names: list[str], batch_size: int = 6
) -> dict[str, Any]:
    """Per-class image IoU of ``labeler`` (the real inference path) against GT, at GT resolution."""
    n = len(class_names)
    conf = np.zeros((n, n), dtype=np.int64)
    t0 = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task("evaluating labeler", total=len(pairs))
        for k in range(0, len(pairs), batch_size):
            chunk = pairs[k : k + batch_size]
            data = [_read_pair(i, g) for i, g in chunk]
            hw = data[0][1].shape
            inputs = [labeler.preprocess(rgb) for rgb, _ in data]
            pred, _ = labeler.predict(inputs, hw, confidence=False)
            for p, (_, gt) in zip(pred, data):
                valid = gt < n
                conf += np.bincount(gt[valid].astype(np.int64) * n + p[valid], minlength=n * n).reshape(n, n)
            bar.advance(task, len(chunk))
    seconds = time.perf_counter() - t0
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = {c: (float(inter[i] / union[i]) if union[i] else None) for i, c in enumerate(class_names)}
    present = [v for v in iou.values() if v is not None]
    return {
        "iou": iou,
        "miou": float(np.mean(present)) if present else None,
        "pixel_accuracy": float(inter.sum() / max(conf.sum(), 1)),
        "gt_pixels": {c: int(conf[i].sum()) for i, c in enumerate(class_names)},
        "images": len(pairs),
        "seconds_per_image": seconds / max(len(pairs), 1),
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_labeler(
    train_pairs: list[tuple[Path, Path]],
    class_names: list[str],
    out: Path,
    cfg: TrainLabelerConfig = TrainLabelerConfig(),
    init: Path | None = None,
) -> Path:
    """Train (from scratch, or on from the weights in ``init``), save ``save_pretrained`` +
    processor into ``out`` (atomically)."""
    torch.set_num_threads(max(1, cfg.threads))
    _seed_everything(cfg.seed)
    model, processor = build_model(class_names, cfg.model, cfg.train_points)
    if init is not None:
        from transformers import Mask2FormerForUniversalSegmentation  # noqa: PLC0415 - transformers: seconds to import; only when a Mask2Former or a ResNet backbone is built


        _read_config(Path(init))  # a mask2former config without remote code
        with quiet_transformers():
            model = Mask2FormerForUniversalSegmentation.from_pretrained(
                str(init), local_files_only=True, trust_remote_code=False, use_safetensors=True,
                train_num_points=cfg.train_points,
            )
        if [model.config.id2label[i] for i in range(len(class_names))] != list(class_names):
            raise BevctlError(f"{init}: its classes differ from the training data's")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    ema = None
    t0 = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("training labeler", total=cfg.steps, loss=float("nan"))
        for step in range(cfg.steps):
            if len(order) < cfg.batch_size:
                order.extend(rng.permutation(len(train_pairs)).tolist())
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            batch = _make_batch([train_pairs[i] for i in idx], processor, rng, len(class_names), cfg.crop_hw)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = float(loss.detach())
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            bar.update(task, advance=1, loss=ema)
            if step % 50 == 0 or step == cfg.steps - 1:
                log.info("step %d/%d loss %.3f (ema %.3f) lr %.2e, %.2f s/step", step, cfg.steps, value,
                         ema, lr_at(step), (time.perf_counter() - t0) / (step + 1))
    log.info("trained %d steps in %.0f s (final loss ~%.3f)", cfg.steps, time.perf_counter() - t0, ema or 0.0)

    model.eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _synth_source_hash() -> str:
    """sha256 over the synthetic generator's sources (``bevctl/data/synth*.py``)."""
    h = hashlib.sha256()
    for f in sorted(Path(synth_mod.__file__).parent.glob("synth*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def make_synth_data(work: Path, seed: int, scenes: int, samples_per_scene: int) -> Path:
    """A synthetic dataset under ``work`` (kept between runs: same arguments, same bytes).

    A cached dataset written by another version of the generator (its sources' hash is stamped
    next to it) is regenerated, so a changed world (e.g. the curb band) never trains stale data."""
    root = work / f"synth-seed{seed}-s{scenes}x{samples_per_scene}"
    stamp = work / f"{root.name}.generator-sha256"
    digest = _synth_source_hash()
    fresh = stamp.is_file() and stamp.read_text().strip() == digest
    if not (fresh and (root / "semantic" / "classes.json").is_file()):
        cfg = SynthConfig(scenes=scenes, samples_per_scene=samples_per_scene, seed=seed)
        write_synthetic_dataset(cfg, root, overwrite=True)
        stamp.write_text(digest + "\n")
    return root


def run_train_labeler(
    out: Path,
    work: Path,
    data: Path | None = None,
    eval_data: Path | None = None,
    cfg: TrainLabelerConfig = TrainLabelerConfig(),
    train_scenes: int = 12,
    eval_scenes: int = 3,
    samples_per_scene: int = 10,
    init: Path | None = None,
) -> dict[str, Any]:
    """The ``bevctl train-labeler`` command: data, training, held-out evaluation, metrics."""
    if init is not None:  # before minutes of data generation: a bad --init fails at once
        _read_config(Path(init))
    work.mkdir(parents=True, exist_ok=True)
    data = data or make_synth_data(work, 101, train_scenes, samples_per_scene)
    eval_data = eval_data or make_synth_data(work, 202, eval_scenes, samples_per_scene)
    names = synth_class_names(data)
    if synth_class_names(eval_data) != names:
        raise BevctlError(f"{eval_data}: class list differs from the training data's ({data})")
    train_pairs, eval_pairs = find_pairs(data), find_pairs(eval_data)
    log.info("training on %d images from %s; held out: %d images from %s", len(train_pairs), data,
             len(eval_pairs), eval_data)
    t0 = time.perf_counter()
    train_labeler(train_pairs, names, out, cfg, init=init)
    train_s = time.perf_counter() - t0
    labeler = HFMask2FormerLabeler(str(out), out, device="cpu")
    metrics = evaluate_labeler(labeler, eval_pairs, names)
    metrics.update({
        "train_seconds": train_s,
        "train_images": len(train_pairs),
        "train_data": str(data),
        "eval_data": str(eval_data),
        "config": asdict(cfg),
        "weights_hash": labeler.weights_hash,
        "init": str(init) if init is not None else None,
        "params": int(sum(p.numel() for p in labeler.model.parameters())),
    })
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("held-out IoU: %s", {k: round(v, 3) if v is not None else None for k, v in metrics["iou"].items()})
    return metrics
