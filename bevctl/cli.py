"""The ``bevctl`` command line: each command parses its options and calls one library function.

Library code raises :class:`bevctl.errors.BevctlError` for user mistakes; :func:`main` turns it
into one ``error: ...`` line and exit code 2 (no traceback). Ctrl-C exits with 130.
Imports of heavy modules (torch, ray, transformers) happen inside the commands so that
``bevctl --help`` stays fast. Usage errors (a bad option value) are one ``error:`` line too.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer

import bevctl
from bevctl.errors import BevctlError, one_line
from bevctl.train.config import TRAIN_PRESETS, TrainConfig

app = typer.Typer(
    name="bevctl",
    help="Fine-grained BEV road-marking maps from six cameras with few BEV labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags without a <bool> metavar, long defaults not cut off
)


def _print_version(value: bool) -> None:
    if value:
        print(f"bevctl {bevctl.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the bevctl version and exit."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # object-storage clients log every endpoint and credential lookup at INFO
        for name in ("botocore", "aiobotocore", "s3fs", "fsspec"):
            logging.getLogger(name).setLevel(logging.WARNING)


# Store and run paths go through bevctl.storage.location: plain strings, so that a URL's "//"
# survives (a Path would fold s3://b/k into s3:/b/k).
_URL_HELP = " A local path or a URL (s3://, gs://, file://, ...)."


def _check_urls(*targets: Optional[str]) -> None:
    """One error line, before any work, for a URL with a bad protocol, bucket or credentials."""
    from bevctl.storage.location import check

    for target in targets:
        if target:
            check(target)


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """A full disk while a command writes ``out`` is one error line naming ``out`` (where the
    library could not name the file itself, e.g. a Zarr chunk or a completion record)."""
    from bevctl.io import disk_full_error, is_disk_full

    try:
        yield
    except BevctlError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full_error(out) from None
        raise


# ---- synth ------------------------------------------------------------------------------------


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Directory to write the synthetic nuScenes-format dataset into."),
    scenes: int = typer.Option(10, "--scenes", help="Number of scenes."),
    samples_per_scene: int = typer.Option(40, "--samples-per-scene", help="Keyframes (2 Hz) per scene."),
    image_size: str = typer.Option("225x400", "--image-size", help="Camera image size HxW."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same bytes."),
    version: str = typer.Option("v1.0-synth", "--version", help="nuScenes version folder name."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace an existing dataset in OUT."),
) -> None:
    """Write a synthetic world in nuScenes format (tables, JPEGs, map expansion, image GT)."""
    from bevctl.config import parse_hw
    from bevctl.data.synth import SynthConfig, write_synthetic_dataset

    cfg = SynthConfig(
        scenes=scenes,
        samples_per_scene=samples_per_scene,
        image_hw=parse_hw(image_size, "--image-size"),
        seed=seed,
        version=version,
    )
    summary = write_synthetic_dataset(cfg, out, overwrite=overwrite)
    root, ver = summary["out"], summary["version"]
    print(f"wrote {summary['samples']} samples of {scenes} scenes to {root} (version folder {ver}); next:\n"
          f"  bevctl pseudolabel --dataroot {root} --version {ver} --model bevctl-synth --out labels.zarr\n"
          f"  bevctl prepare-gt --dataroot {root} --version {ver} --config demo --out gt.zarr\n"
          f"  bevctl pretrain --dataroot {root} --version {ver} --labels labels.zarr --out runs/pre\n"
          f"  bevctl finetune --dataroot {root} --version {ver} --gt gt.zarr --init runs/pre --out runs/ft")


# ---- demo -------------------------------------------------------------------------------------


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-run"), "--out", help="Directory for everything the demo writes."),
    quick: bool = typer.Option(False, "--quick/--no-quick", help="A smaller world and shorter training (a few minutes)."),
    labeler: Optional[str] = typer.Option(
        None, "--labeler", help="Pseudo-labeler: bevctl-synth (default, the shipped Mask2Former) or synth-gt (perfect labels)."
    ),
) -> None:
    """Run the method end to end on the embedded synthetic world (offline, CPU); resumable."""
    from bevctl.demo import run_demo

    with _writing(out):
        run_demo(out, quick=quick, labeler=labeler)


# ---- prepare-gt -------------------------------------------------------------------------------


@app.command("prepare-gt")
def prepare_gt_cmd(
    dataroot: Path = typer.Option(..., "--dataroot", help="nuScenes dataroot (with maps/expansion/)."),
    version: str = typer.Option("v1.0-trainval", "--version", help="nuScenes version folder."),
    config: Optional[str] = typer.Option(
        None, "--config", help="Take grid and class set from this training preset (demo, toy, tiny, hdmapnet) or "
        "YAML file: the GT store then fits the training runs of that config. Not with --grid/--classes."),
    grid: Optional[str] = typer.Option(None, "--grid", help="BEV grid preset (hdmapnet, demo) or YAML file.  "
                                       "[default: hdmapnet]"),
    classes: Optional[str] = typer.Option(None, "--classes", help="BEV class set preset (hdmapnet, markings) or "
                                          "YAML file.  [default: hdmapnet]"),
    out: str = typer.Option(..., "--out", help="Output Zarr store, e.g. gt.zarr." + _URL_HELP),
    splits: Optional[str] = typer.Option(None, "--splits", help="Comma-separated splits (default: all)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes (default: CPU count; 0 = in process)."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Rebuild the store from scratch."),
) -> None:
    """Rasterise map-expansion BEV ground truth of every sample once into a Zarr cache (resumable)."""
    from bevctl.config import resolve_class_set, resolve_grid
    from bevctl.data.nuscenes import load_index, parse_splits
    from bevctl.storage.gt_store import format_summary, prepare_gt
    from bevctl.train.config import load_train_config

    _check_urls(out)

    if config is not None:
        if grid is not None or classes is not None:
            raise BevctlError("--config takes the grid and class set from the training config; "
                              "pass either --config or --grid/--classes")
        train_cfg = load_train_config(config)
        grid, classes = train_cfg.grid, train_cfg.class_set
    bev_grid = resolve_grid(grid or "hdmapnet")
    class_set = resolve_class_set(classes or "hdmapnet")
    if workers is not None and workers < 0:
        raise BevctlError(f"--workers must be >= 0, got {workers}")
    index = load_index(dataroot, version)
    split_list = parse_splits(splits, index) if splits else None
    with _writing(out):
        summary = prepare_gt(dataroot, version, bev_grid, class_set, out, splits=split_list,
                             workers=workers, overwrite=overwrite, index=index)
    print(format_summary(summary))
    if summary.failed:
        raise BevctlError(f"prepare-gt: {summary.failed} sample(s) failed (listed above); rerun to retry them")


# ---- pseudolabel / labels ---------------------------------------------------------------------


@app.command()
def pseudolabel(
    dataroot: Path = typer.Option(..., "--dataroot", help="nuScenes dataroot."),
    version: str = typer.Option("v1.0-trainval", "--version", help="nuScenes version folder."),
    out: str = typer.Option(..., "--out", help="Output Zarr store, e.g. labels.zarr." + _URL_HELP),
    model: str = typer.Option(
        "facebook/mask2former-swin-large-mapillary-vistas-semantic", "--model",
        help="Hub id, local save_pretrained directory, bevctl-synth, or a stand-in (synth-gt, sleep:<s>).",
    ),
    gpus: int = typer.Option(0, "--gpus", help="Labeler actors with one GPU each."),
    workers: int = typer.Option(1, "--workers", help="CPU labeler actors (ignored with --gpus); 0 = no Ray, in process."),
    address: Optional[str] = typer.Option(None, "--address", help="Join this Ray cluster (default: start a local one)."),
    batch_size: int = typer.Option(6, "--batch-size", help="Images per model call (rounded up to whole samples)."),
    splits: Optional[str] = typer.Option(None, "--splits", help="Comma-separated splits (default: all)."),
    resolution: Optional[str] = typer.Option(None, "--resolution", help="Stored mask size HxW (default: the image size)."),
    confidence: bool = typer.Option(False, "--confidence/--no-confidence", help="Also store per-pixel confidence (uint8)."),
    on_error: str = typer.Option("fail", "--on-error", help="Unreadable image: fail (stop, name it) or skip (record the sample as failed)."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Rebuild the store from scratch."),
) -> None:
    """Label every camera image with a semantic segmenter (Ray job) into a Zarr store (resumable)."""
    from bevctl.pseudolabel.job import PseudolabelConfig, format_summary, parse_resolution, run_pseudolabel

    _check_urls(out)

    cfg = PseudolabelConfig(
        dataroot=str(dataroot), version=version, out=str(out), model=model, gpus=gpus, workers=workers,
        address=address, batch_size=batch_size,
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()) if splits else None,
        resolution=parse_resolution(resolution) if resolution else None,
        confidence=confidence, on_error=on_error, overwrite=overwrite,
    )
    with _writing(out):
        summary = run_pseudolabel(cfg)
    print(format_summary(summary))
    if summary.samples_failed:
        raise typer.Exit(1)


labels_app = typer.Typer(help="Inspect a pseudo-label store.", no_args_is_help=True)
app.add_typer(labels_app, name="labels")


@labels_app.command("stats")
def labels_stats_cmd(
    store: str = typer.Argument(..., help="Pseudo-label Zarr store." + _URL_HELP),
    as_json: bool = typer.Option(False, "--json/--no-json", help="Print JSON."),
) -> None:
    """Class histogram and coverage, sample counts, bytes on disk, compression ratio."""
    from bevctl.pseudolabel.show import format_stats
    from bevctl.storage.labels import label_stats

    stats = label_stats(store)
    if as_json:
        import json

        print(json.dumps(stats, indent=2))
    else:
        print(format_stats(stats))


@labels_app.command("show")
def labels_show_cmd(
    store: str = typer.Argument(..., help="Pseudo-label Zarr store." + _URL_HELP),
    sample: Optional[str] = typer.Option(None, "--sample", help="Sample token (default: the first done sample)."),
    out: Path = typer.Option(Path("labels.png"), "--out", help="PNG to write."),
    dataroot: Optional[Path] = typer.Option(None, "--dataroot", help="Dataset root (default: the one recorded in the store)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Mask opacity over the image."),
) -> None:
    """The six camera images of a sample with their masks overlaid, as one PNG."""
    from bevctl.pseudolabel.show import show_sample

    path = show_sample(store, out, token=sample, dataroot=dataroot, alpha=alpha)
    print(f"wrote {path}")


# ---- verify -----------------------------------------------------------------------------------


@app.command()
def verify(
    store: str = typer.Argument(..., help="Pseudo-label store or GT cache." + _URL_HELP),
    repair: bool = typer.Option(False, "--repair", help="Mark damaged samples todo, so that rerunning the command "
                                "that made the store redoes exactly those (not while a job writes the store)."),
    workers: int = typer.Option(8, "--workers", help="Threads reading chunks in parallel."),
    dataroot: Optional[Path] = typer.Option(None, "--dataroot", help="Also check that the store's samples are this "
                                            "dataset's (the version and splits the store records)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check every chunk of every finished sample (present, decodes, checksum) and the metadata; exit 1 if damaged."""
    from bevctl.storage.verify import as_dict, format_report, verify_store

    _check_urls(store)
    if workers < 1:
        raise BevctlError(f"--workers must be >= 1, got {workers}")
    report = verify_store(store, workers=workers, repair=repair, progress=not as_json,
                          dataroot=str(dataroot) if dataroot else None)
    if as_json:
        import json

        print(json.dumps(as_dict(report), indent=2))
    else:
        print(format_report(report))
    if not report.ok:
        raise typer.Exit(1)


# ---- train-labeler ----------------------------------------------------------------------------


@app.command("train-labeler")
def train_labeler_cmd(
    out: Path = typer.Option(..., "--out", help="Directory for the trained labeler (save_pretrained layout)."),
    work: Path = typer.Option(Path(".cache/train-labeler"), "--work", help="Scratch dir: synthetic data, metrics.json."),
    data: Optional[Path] = typer.Option(None, "--data", help="Synthetic dataset to train on (default: generate, seed 101)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out dataset (default: generate, seed 202)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: the shipped recipe)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step."),
    seed: int = typer.Option(0, "--seed", help="Training seed."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for torch (1 is fastest on a busy machine)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from the weights of an earlier train-labeler run."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate."),
    input_short_side: Optional[int] = typer.Option(None, "--input-short-side", help="Model input short side (px)."),
) -> None:
    """Train the small Mask2Former shipped as `bevctl-synth` on the synthetic world's image GT."""
    import dataclasses

    from bevctl.pseudolabel.train_labeler import TrainLabelerConfig, run_train_labeler

    cfg = TrainLabelerConfig(seed=seed, threads=threads)
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    if batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    if lr is not None:
        cfg = dataclasses.replace(cfg, lr=lr)
    if input_short_side is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, shortest_edge=input_short_side))
    metrics = run_train_labeler(out, work, data=data, eval_data=eval_data, cfg=cfg, init=init)
    ious = ", ".join(f"{k} {v:.3f}" for k, v in metrics["iou"].items() if v is not None)
    print(f"wrote {out}; held-out IoU: {ious}; mIoU {metrics['miou']:.3f}")


# ---- training / evaluation (bevctl.train) -------------------------------------------------------


def _from_preset(key: str) -> str:
    """The help's default of an option that the --config preset sets, e.g. ' [default: from the preset (demo: 1)]'."""
    value = TRAIN_PRESETS["demo"].get(key, getattr(TrainConfig, key))
    return f"  [default: from the preset (demo: {value})]"


_TRAIN_HELP = {
    "config": "Training preset (demo, toy, tiny, hdmapnet) or YAML file of TrainConfig keys.",
    "epochs": "Epochs (with --max-steps: whichever ends first; fixes the LR schedule; with --resume a higher "
              "value continues the run).",
    "max_steps": "Stop after this many optimiser steps (0 = epochs decide; if the epochs end first, a line says "
                 "so and which --epochs runs them all).",
}


def _train_command(mode: str, dataroot: Path, version: str, out: str, config: Optional[str], *,
                   labels: Optional[str] = None, gt: Optional[str] = None, init: Optional[str] = None,
                   fraction: Optional[float] = None, epochs: Optional[int], max_steps: Optional[int],
                   checkpoint_every: Optional[int], batch_size: Optional[int], lr: Optional[float],
                   seed: Optional[int], resume: bool, gpus: int, device: str, workers: Optional[int],
                   on_corrupt: Optional[str] = None) -> None:
    from bevctl.storage.location import absolute
    from bevctl.train.build import resolve
    from bevctl.train.config import load_train_config
    from bevctl.train.loop import RunSpec, train

    _check_urls(out, labels, gt, init)

    arch: dict = {}
    if init is not None and config is None:  # same architecture as the pretrained checkpoint
        from bevctl.train.checkpoint import load_checkpoint

        saved = load_checkpoint(init)["config"]
        arch = {k: saved[k] for k in ("model", "grid", "class_set", "image_hw") if k in saved}
    cfg = load_train_config(config or "demo", epochs=epochs, max_steps=max_steps, checkpoint_every=checkpoint_every,
                            batch_size=batch_size, lr=lr, seed=seed, fraction=fraction, num_workers=workers,
                            on_corrupt=on_corrupt, **arch)
    resolve(cfg)  # an unknown model preset or a bad model file fails before any data is read
    if gpus < 1:
        raise BevctlError(f"--gpus must be >= 1, got {gpus}")
    # absolute paths: the run records them, and visualize/evaluate may read it from elsewhere
    spec = RunSpec(mode=mode, cfg=cfg, run_dir=out, dataroot=absolute(dataroot), version=version,
                   labels=absolute(labels) if labels else None, gt=absolute(gt) if gt else None,
                   init=absolute(init) if init else None, resume=resume, device=device, gpus=gpus)
    with _writing(out):
        train(spec)


@app.command()
def pretrain(
    dataroot: Path = typer.Option(..., "--dataroot", help="nuScenes dataroot."),
    version: str = typer.Option("v1.0-trainval", "--version", help="nuScenes version folder."),
    labels: str = typer.Option(..., "--labels", help="Pseudo-label store (labels.zarr)." + _URL_HELP),
    out: str = typer.Option(..., "--out", help="Run directory (config, scenes, metrics, checkpoints, last.pt)."
                            + _URL_HELP),
    config: Optional[str] = typer.Option("demo", "--config", help=_TRAIN_HELP["config"]),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=_TRAIN_HELP["epochs"] + _from_preset("epochs")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help=_TRAIN_HELP["max_steps"] + _from_preset("max_steps")),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps." + _from_preset("checkpoint_every")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per process per micro-batch." + _from_preset("batch_size")),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate." + _from_preset("lr")),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (init, data order)." + _from_preset("seed")),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="Continue the run in --out from last.pt."),
    gpus: int = typer.Option(1, "--gpus", help="Local processes (DDP); under torchrun leave at 1."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes." + _from_preset("num_workers")),
    on_corrupt: Optional[str] = typer.Option(
        None, "--on-corrupt", help="A missing/corrupt chunk of a finished sample: fail (stop, name it; default) or "
        "skip (ignore its labels, count and log them)."),
) -> None:
    """Self-supervised pretraining: BEV logits reprojected into the cameras vs pseudo-labels (+ temporal)."""
    _train_command("pretrain", dataroot, version, out, config, labels=labels, epochs=epochs, max_steps=max_steps,
                   checkpoint_every=checkpoint_every, batch_size=batch_size, lr=lr, seed=seed, resume=resume,
                   gpus=gpus, device=device, workers=workers, on_corrupt=on_corrupt)


@app.command()
def finetune(
    dataroot: Path = typer.Option(..., "--dataroot", help="nuScenes dataroot."),
    version: str = typer.Option("v1.0-trainval", "--version", help="nuScenes version folder."),
    gt: Optional[str] = typer.Option(None, "--gt", help="BEV GT cache (gt.zarr from prepare-gt); default: rasterise on the fly."
                                     + _URL_HELP),
    init: Optional[str] = typer.Option(None, "--init", help="Pretrained checkpoint (omit: supervised baseline from scratch)."
                                       + _URL_HELP),
    fraction: Optional[float] = typer.Option(
        None, "--fraction", help="Fraction of labelled training scenes (seeded, scene-level)." + _from_preset("fraction")),
    out: str = typer.Option(..., "--out", help="Run directory." + _URL_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=_TRAIN_HELP["config"]
                                         + " Default: demo; with --init, the init checkpoint's model/grid/classes."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=_TRAIN_HELP["epochs"] + _from_preset("epochs")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help=_TRAIN_HELP["max_steps"] + _from_preset("max_steps")),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps." + _from_preset("checkpoint_every")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per process per micro-batch." + _from_preset("batch_size")),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate." + _from_preset("lr")),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (init, scene subset, data order)." + _from_preset("seed")),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="Continue the run in --out from last.pt."),
    gpus: int = typer.Option(1, "--gpus", help="Local processes (DDP); under torchrun leave at 1."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes." + _from_preset("num_workers")),
    on_corrupt: Optional[str] = typer.Option(
        None, "--on-corrupt", help="A missing/corrupt chunk of a finished sample: fail (stop, name it; default) or "
        "skip (ignore its labels, count and log them)."),
) -> None:
    """Supervised fine-tuning on a fraction of the BEV labels (from a pretrained checkpoint or scratch)."""
    _train_command("finetune", dataroot, version, out, config, gt=gt, init=init, fraction=fraction, epochs=epochs,
                   max_steps=max_steps, checkpoint_every=checkpoint_every, batch_size=batch_size, lr=lr, seed=seed,
                   resume=resume, gpus=gpus, device=device, workers=workers, on_corrupt=on_corrupt)


@app.command()
def evaluate(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint (.pt) or run directory (uses last.pt)."
                                   + _URL_HELP),
    dataroot: Path = typer.Option(..., "--dataroot", help="nuScenes dataroot."),
    version: str = typer.Option("v1.0-trainval", "--version", help="nuScenes version folder."),
    split: str = typer.Option("val", "--split", help="Split to evaluate."),
    gt: Optional[str] = typer.Option(None, "--gt", help="BEV GT cache; default: rasterise on the fly." + _URL_HELP),
    out: Optional[str] = typer.Option(None, "--out", help="Write JSON here (and a .md beside it)." + _URL_HELP),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    batch_size: int = typer.Option(2, "--batch-size", help="Samples per forward pass."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes."),
    range_edges: Optional[str] = typer.Option(
        None, "--range-edges", help="Distance bands for the per-range IoU, comma-separated metres, e.g. '4,8,12' "
        "(default: 1/4, 1/2, 3/4 of the grid's forward half-length)."),
) -> None:
    """Per-class IoU and mIoU of a checkpoint on a split (argmax; every grid cell counts), also per distance band."""
    from bevctl.train.evaluate import evaluate as run_eval, format_markdown

    _check_urls(checkpoint, gt, out)
    edges = None
    if range_edges:
        try:
            edges = tuple(float(e) for e in range_edges.split(","))
        except ValueError:
            raise BevctlError(f"--range-edges: expected comma-separated metres like '4,8,12', got '{range_edges}'") from None

    result = run_eval(checkpoint, str(dataroot), version, split, str(gt) if gt else None, out, device=device,
                      batch_size=batch_size, num_workers=workers, range_edges=edges)
    print(format_markdown(result), end="")


@app.command()
def predict(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint (.pt) or run directory (uses last.pt)."
                                   + _URL_HELP),
    dataroot: Path = typer.Option(..., "--dataroot", help="nuScenes dataroot."),
    version: str = typer.Option("v1.0-trainval", "--version", help="nuScenes version folder."),
    out: str = typer.Option(..., "--out", help="Prediction store (preds.zarr) to write or resume." + _URL_HELP),
    split: Optional[str] = typer.Option(None, "--split", help="Predict this split's samples."),
    scenes: Optional[str] = typer.Option(None, "--scenes", help="Predict these scenes (comma-separated names)."),
    samples: Optional[str] = typer.Option(None, "--samples", help="Predict these samples (comma-separated tokens or "
                                          "SCENE:INDEX). Default (no --split/--scenes/--samples): every sample."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also store per-class probabilities (uint8)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    batch_size: int = typer.Option(4, "--batch-size", help="Samples per forward pass (a temporal model takes 1)."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store instead of resuming it."),
) -> None:
    """Run a trained model over samples in scene order (with its temporal history) into a Zarr store."""
    from bevctl.train.predict import format_summary, predict as run_predict

    _check_urls(checkpoint, out)

    def names(text: Optional[str]) -> Optional[list[str]]:
        return None if text is None else [t.strip() for t in text.split(",") if t.strip()]

    summary = run_predict(checkpoint, str(dataroot), version, out, split=split, scenes=names(scenes),
                          samples=names(samples), probabilities=probabilities, device=device, batch_size=batch_size,
                          num_workers=workers, overwrite=overwrite)
    print(format_summary(summary))


@app.command()
def visualize(
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint (.pt) or run directory." + _URL_HELP),
    sample: Optional[str] = typer.Option(None, "--sample", help="Sample token, or SCENE:INDEX (e.g. scene-0002:3); "
                                         "`bevctl samples` lists them."),
    scene: Optional[str] = typer.Option(None, "--scene", help="Animate a whole scene instead (--out drive.gif or .mp4)."),
    out: Path = typer.Option(..., "--out", help="Directory for the PNGs (--sample), or the .gif/.mp4 (--scene)."),
    models: Optional[str] = typer.Option(None, "--models", help="With --scene: comma-separated checkpoints drawn side "
                                         "by side (instead of --checkpoint)."),
    dataroot: Optional[Path] = typer.Option(None, "--dataroot", help="Default: the run's dataroot."),
    version: Optional[str] = typer.Option(None, "--version", help="Default: the run's version."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Pseudo-labels to show (default: the run's)." + _URL_HELP),
    gt: Optional[str] = typer.Option(None, "--gt", help="BEV GT cache (default: the run's, else rasterise)." + _URL_HELP),
    overlay: str = typer.Option("prediction", "--overlay", help="With --scene: what the cameras show, "
                                "prediction (of the first model) or pseudo-labels."),
    fps: float = typer.Option(2.0, "--fps", help="With --scene: frames per second (nuScenes keyframes are 2 Hz)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """PNGs of one sample (BEV prediction, its errors and the GT; the prediction on the six cameras
    beside the pseudo-labels), or an animation of a whole scene (--scene)."""
    if (sample is None) == (scene is None):
        raise BevctlError("visualize: give exactly one of --sample (PNGs) or --scene (an animation)")
    checkpoints = [c for c in (models or "").split(",") if c] or ([checkpoint] if checkpoint else [])
    if not checkpoints:
        raise BevctlError("visualize: give --checkpoint (or, with --scene, --models A,B)")
    if models and (checkpoint or sample):
        raise BevctlError("visualize: --models goes with --scene and replaces --checkpoint")
    _check_urls(*checkpoints, labels, gt)
    paths = dict(dataroot=str(dataroot) if dataroot else None, version=version, labels=labels, gt=gt, device=device)
    if scene is not None:
        from bevctl.train.animate import animate_scene

        path, frames = animate_scene(checkpoints, scene, out, fps=fps, overlay=overlay, **paths)
        print(f"wrote {path} ({frames} frames)")
        return
    from bevctl.train.visualize import visualize as run_vis

    written = run_vis(checkpoints[0], sample, out, **paths)
    print(f"wrote {len(written)} images to {out}")


@app.command()
def samples(
    dataroot: Path = typer.Option(..., "--dataroot", help="nuScenes dataroot."),
    version: str = typer.Option("v1.0-trainval", "--version", help="nuScenes version folder."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split (default: every split)."),
) -> None:
    """List a dataset's splits, their scenes and sample tokens (as SCENE:INDEX  TOKEN lines)."""
    from bevctl.data.nuscenes import load_index

    print(load_index(dataroot, version).listing(split))


def main() -> None:
    try:
        # typer turns Ctrl-C into Exit(130) and, with standalone_mode=False, *returns* exit codes
        rv = app(standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            if rv == 130:
                print("interrupted: rerun the same command to resume", file=sys.stderr)
            sys.exit(rv)
    except BevctlError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        # usage errors arrive as ClickException (typer vendors click, so match by class name): one
        # line naming the command's --help, as for every other bad input
        if any(c.__name__ == "ClickException" for c in type(e).__mro__):
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"error: {one_line(e.format_message())}{where}", file=sys.stderr)  # type: ignore[attr-defined]
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        from bevctl.io import disk_full_error, is_disk_full

        if is_disk_full(e):  # a write the library did not name itself (e.g. a Zarr chunk)
            print(f"error: {disk_full_error(getattr(e, 'filename', None))}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
