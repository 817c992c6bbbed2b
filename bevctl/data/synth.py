"""A synthetic world written in the nuScenes format (``bevctl synth OUT``).

Writes, under ``OUT``:

* ``<version>/*.json`` -- all 13 nuScenes tables (keyframes only; six cameras + LIDAR_TOP,
  every sample_data with its own ego pose), plus ``bevctl_splits.json`` (scene-level split)
  and ``bevctl_world.json`` (the world's own ground geometry per class, global frame);
* ``samples/CAM_*/...jpg`` camera images, ``samples/LIDAR_TOP/...pcd.bin`` tiny point clouds;
* ``maps/expansion/singapore-onenorth.json`` (map expansion v1.3) and ``maps/<token>.png``;
* ``semantic/<image path>.png`` exact per-pixel class ids, ``semantic/classes.json``.

Image GT rules (class ids = :data:`SYNTH_CLASSES`): each pixel takes the class of what its
centre ray hits first (nuScenes convention: pixel centres at integer coordinates). Ground
classes come from the world's exact geometry: ``crosswalk`` is the whole ped_crossing
polygon (stripes and the gaps between them), ``stop_line`` a 0.4 m bar over the incoming
lanes, ``lane_marking`` the white dividers as painted (0.15 m, dashes 3 m / gaps 5 m, solid
near intersections), ``road_divider_marking`` the double yellow centre line (2 x 0.12 m),
``curb`` a 0.3 m strip centred on the road edge (0.15 m on the road, 0.15 m outside, the
nuScenes / HDMapNet ``boundary`` band; crosswalks and stop lines are painted over it), then
``sidewalk``; everything else on the
ground is ``other_ground``. Vehicles (car = body + cabin, truck = cab + cargo, all inside the
annotated box) occlude the ground; rays that miss everything are ``sky``. Texture, shadows,
haze, noise and JPEG only change colours, never labels.

Modules: :mod:`synth_world` (analytic world), :mod:`synth_map` (polygons, map expansion),
:mod:`synth_scene` (routes, rig, vehicles), :mod:`synth_render` (ray casting).
Deterministic for a seed; rendering runs in a process pool over (scene, sample-chunk) jobs;
the dataset is built in a temp directory and renamed into place when complete.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bevctl.config import parse_hw
from bevctl.data.synth_map import build_map_expansion, map_mask, world_json
from bevctl.data.synth_render import camera_rays, noise_tiles, render
from bevctl.data.synth_scene import (
    LIDAR_T_EGO,
    SYNTH_CAMERAS,
    ScenePlan,
    plan_scene,
    rot_to_quat,
    yaw_quat,
)
from bevctl.data.synth_world import SYNTH_CLASSES, World, make_world, token
from bevctl.errors import BevctlError

__all__ = ["SYNTH_CLASSES", "SynthConfig", "parse_hw", "write_synthetic_dataset", "MAP_NAME"]

log = logging.getLogger(__name__)

MAP_NAME = "singapore-onenorth"


@dataclass(frozen=True)
class SynthConfig:
    scenes: int = 10
    samples_per_scene: int = 40
    image_hw: tuple[int, int] = (225, 400)
    seed: int = 0
    version: str = "v1.0-synth"
    grid: tuple[int, int] = (5, 5)  # streets (cols, rows) of the world
    val_fraction: float = 0.2
    workers: int = 0  # render processes; 0 = one per CPU (at most one per job), 1 = in-process
    chunk: int = 5  # samples per render job

    def __post_init__(self) -> None:
        if self.scenes < 1:
            raise BevctlError(f"--scenes must be >= 1, got {self.scenes}")
        if self.samples_per_scene < 1:
            raise BevctlError(f"--samples-per-scene must be >= 1, got {self.samples_per_scene}")
        h, w = self.image_hw
        if not (16 <= h <= 2000 and 16 <= w <= 4000):
            raise BevctlError(f"--image-size {h}x{w}: height must be in [16, 2000] and width in [16, 4000]")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.version):
            raise BevctlError(f"--version '{self.version}': use letters, digits, '.', '_' or '-' only")
        if min(self.grid) < 3:
            raise BevctlError(f"synth grid {self.grid}: need at least 3 x 3 streets")
        if not 0.0 <= self.val_fraction < 1.0:
            raise BevctlError(f"synth val_fraction must be in [0, 1), got {self.val_fraction}")


# --------------------------------------------------------------------------------------------
# Paths and tokens
# --------------------------------------------------------------------------------------------


def _logfile(cfg: SynthConfig, scene: int) -> str:
    return f"synth-s{cfg.seed}-{scene + 1:04d}"


def image_relpath(cfg: SynthConfig, plan: ScenePlan, sample: int, channel: str) -> str:
    t = plan.cam_time_us(sample, channel)
    return f"samples/{channel}/{_logfile(cfg, plan.index)}__{channel}__{t}.jpg"


def lidar_relpath(cfg: SynthConfig, plan: ScenePlan, sample: int) -> str:
    return f"samples/LIDAR_TOP/{_logfile(cfg, plan.index)}__LIDAR_TOP__{plan.sample_times_us[sample]}.pcd.bin"


def semantic_relpath(image_rel: str) -> str:
    return f"semantic/{image_rel[: -len('.jpg')]}.png"


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _split(cfg: SynthConfig, names: list[str]) -> dict[str, list[str]]:
    n_val = 0 if len(names) < 2 else max(1, int(round(cfg.val_fraction * len(names))))
    order = np.random.default_rng([cfg.seed, 4004]).permutation(len(names))
    val = sorted(names[i] for i in order[:n_val])
    return {"train": [n for n in names if n not in val], "val": val}


def build_tables(cfg: SynthConfig, world: World, plans: list[ScenePlan], map_png: str) -> dict[str, list]:
    seed = cfg.seed
    h, w = cfg.image_hw
    T = lambda *p: token(seed, *p)  # noqa: E731
    tables: dict[str, list] = {k: [] for k in (
        "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose",
        "log", "scene", "sample", "sample_data", "sample_annotation", "map",
    )}
    for name, desc in (("vehicle.car", "Passenger car."), ("vehicle.truck", "Truck or van.")):
        tables["category"].append({"token": T("category", name), "name": name, "description": desc})
    for name in ("vehicle.moving", "vehicle.parked", "vehicle.stopped"):
        tables["attribute"].append({"token": T("attribute", name), "name": name, "description": name})
    for i, lvl in enumerate(("v0-40", "v40-60", "v60-80", "v80-100")):
        tables["visibility"].append({"token": str(i + 1), "level": lvl, "description": f"visibility {lvl}"})
    sensors = list(SYNTH_CAMERAS) + ["LIDAR_TOP"]
    for ch in sensors:
        tables["sensor"].append({"token": T("sensor", ch), "channel": ch, "modality": "lidar" if ch == "LIDAR_TOP" else "camera"})

    log_tokens = []
    for plan in plans:
        sc = plan.index
        lt = T("log", sc)
        log_tokens.append(lt)
        tables["log"].append(
            {"token": lt, "logfile": _logfile(cfg, sc), "vehicle": "synth-ego", "date_captured": "2018-08-01", "location": MAP_NAME}
        )
        # calibrated sensors (per scene: the rig is perturbed per scene)
        cs_tok = {}
        for cam in plan.cameras:
            t = T("calibrated_sensor", sc, cam.channel)
            cs_tok[cam.channel] = t
            tables["calibrated_sensor"].append(
                {
                    "token": t,
                    "sensor_token": T("sensor", cam.channel),
                    "translation": [round(float(v), 9) for v in cam.ego_T_cam[:3, 3]],
                    "rotation": rot_to_quat(cam.ego_T_cam[:3, :3]),
                    "camera_intrinsic": [[float(v) for v in row] for row in cam.pix_T_cam],
                }
            )
        t = T("calibrated_sensor", sc, "LIDAR_TOP")
        cs_tok["LIDAR_TOP"] = t
        tables["calibrated_sensor"].append(
            {"token": t, "sensor_token": T("sensor", "LIDAR_TOP"), "translation": list(LIDAR_T_EGO),
             "rotation": yaw_quat(-math.pi / 2), "camera_intrinsic": []}
        )
        n = len(plan.sample_times_us)
        s_tok = [T("sample", sc, k) for k in range(n)]
        sc_tok = T("scene", sc)
        tables["scene"].append(
            {"token": sc_tok, "log_token": lt, "nbr_samples": n, "first_sample_token": s_tok[0],
             "last_sample_token": s_tok[-1], "name": plan.name,
             "description": f"synthetic drive, {plan.speed:.1f} m/s, {len(plan.vehicles)} vehicles"}
        )
        for k in range(n):
            tables["sample"].append(
                {"token": s_tok[k], "timestamp": plan.sample_times_us[k], "prev": s_tok[k - 1] if k else "",
                 "next": s_tok[k + 1] if k + 1 < n else "", "scene_token": sc_tok}
            )
        for ch in sensors:
            sd_tok = [T("sample_data", sc, k, ch) for k in range(n)]
            for k in range(n):
                ts = plan.sample_times_us[k] if ch == "LIDAR_TOP" else plan.cam_time_us(k, ch)
                pose = plan.global_T_ego(world, ts)
                ep = T("ego_pose", sc, k, ch)
                tables["ego_pose"].append(
                    {"token": ep, "timestamp": ts, "rotation": rot_to_quat(pose[:3, :3]),
                     "translation": [round(float(v), 9) for v in pose[:3, 3]]}
                )
                is_cam = ch != "LIDAR_TOP"
                tables["sample_data"].append(
                    {
                        "token": sd_tok[k],
                        "sample_token": s_tok[k],
                        "ego_pose_token": ep,
                        "calibrated_sensor_token": cs_tok[ch],
                        "timestamp": ts,
                        "fileformat": "jpg" if is_cam else "pcd",
                        "is_key_frame": True,
                        "height": h if is_cam else 0,
                        "width": w if is_cam else 0,
                        "filename": image_relpath(cfg, plan, k, ch) if is_cam else lidar_relpath(cfg, plan, k),
                        "prev": sd_tok[k - 1] if k else "",
                        "next": sd_tok[k + 1] if k + 1 < n else "",
                    }
                )
        # annotations: every vehicle at every keyframe (they are all near the route)
        for vi, v in enumerate(plan.vehicles):
            inst = T("instance", sc, vi)
            a_tok = [T("sample_annotation", sc, vi, k) for k in range(n)]
            tables["instance"].append(
                {"token": inst, "category_token": T("category", v.category), "nbr_annotations": n,
                 "first_annotation_token": a_tok[0], "last_annotation_token": a_tok[-1]}
            )
            attr = T("attribute", "vehicle.moving" if v.speed > 0 else "vehicle.parked")
            for k in range(n):
                p, yaw = v.local_pose((plan.sample_times_us[k] - plan.t0_us) * 1e-6)
                gx, gy = world.to_global(np.array(p[0]), np.array(p[1]))
                tables["sample_annotation"].append(
                    {
                        "token": a_tok[k],
                        "sample_token": s_tok[k],
                        "instance_token": inst,
                        "visibility_token": "4",
                        "attribute_tokens": [attr],
                        "translation": [round(float(gx), 6), round(float(gy), 6), round(v.size[2] / 2, 6)],
                        "size": [round(s_, 6) for s_ in v.size],
                        "rotation": yaw_quat(yaw + world.theta),
                        "prev": a_tok[k - 1] if k else "",
                        "next": a_tok[k + 1] if k + 1 < n else "",
                        "num_lidar_pts": 20,
                        "num_radar_pts": 0,
                    }
                )
    tables["map"].append(
        {"token": T("map", MAP_NAME), "log_tokens": log_tokens, "category": "semantic_prior", "filename": map_png}
    )
    return tables


def _lidar_bytes() -> bytes:
    """A tiny valid nuScenes lidar file: 64 ground points (x, y, z, intensity, ring) float32."""
    a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    pts = np.stack([6 * np.cos(a), 6 * np.sin(a), np.full(64, -LIDAR_T_EGO[2]), np.full(64, 10.0), np.zeros(64)], 1)
    return pts.astype(np.float32).tobytes()


# --------------------------------------------------------------------------------------------
# Rendering jobs
# --------------------------------------------------------------------------------------------


_JOB_CACHE: dict = {}


def _render_job(cfg_dict: dict, scene: int, samples: list[int], root: str) -> int:
    """Render ``samples`` of ``scene`` into ``root`` (runs in a worker process)."""
    cfg = SynthConfig(**{**cfg_dict, "image_hw": tuple(cfg_dict["image_hw"]), "grid": tuple(cfg_dict["grid"])})
    h, w = cfg.image_hw
    key = (cfg, scene)
    if key not in _JOB_CACHE:  # chunks of one scene often land in the same worker: reuse its setup
        world = make_world(cfg.seed, *cfg.grid)
        plan = plan_scene(world, cfg.seed, scene, cfg.samples_per_scene, cfg.image_hw)
        tiles = noise_tiles(cfg.seed)
        rays = [camera_rays(cam, h, w) for cam in plan.cameras]
        noise = np.random.default_rng([cfg.seed, 6006, scene]).standard_normal(h * w * 3 + 65536, np.float32)
        _JOB_CACHE.clear()
        _JOB_CACHE[key] = (world, plan, tiles, rays, noise)
    world, plan, tiles, rays, noise = _JOB_CACHE[key]
    out = Path(root)
    for k in samples:
        for ci, cam in enumerate(plan.cameras):
            rng = np.random.default_rng([cfg.seed, 5005, scene, k, ci])
            t_us = plan.cam_time_us(k, cam.channel)
            rgb, cls = render(world, plan, ci, rays[ci], tiles, t_us, rng, noise)
            rel = image_relpath(cfg, plan, k, cam.channel)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=plan.style["jpeg_quality"])
            (out / rel).write_bytes(buf.getvalue())
            buf = io.BytesIO()
            Image.fromarray(cls).save(buf, format="PNG", compress_level=1)
            (out / semantic_relpath(rel)).write_bytes(buf.getvalue())
    return len(samples)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BevctlError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BevctlError(f"{out}: directory is not empty (pass --overwrite to replace it)")


def write_synthetic_dataset(cfg: SynthConfig, out: Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the synthetic dataset to ``out`` (atomically); returns a small summary dict."""
    out = Path(out).absolute()
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tmp = out.parent / f".{out.name}.synth-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        world = make_world(cfg.seed, *cfg.grid)
        plans = [plan_scene(world, cfg.seed, s, cfg.samples_per_scene, cfg.image_hw) for s in range(cfg.scenes)]
        vdir = tmp / cfg.version
        vdir.mkdir(parents=True)
        for ch in SYNTH_CAMERAS:
            (tmp / "samples" / ch).mkdir(parents=True)
            (tmp / "semantic" / "samples" / ch).mkdir(parents=True)
        (tmp / "samples" / "LIDAR_TOP").mkdir(parents=True)
        (tmp / "maps" / "expansion").mkdir(parents=True)


        map_png = f"maps/{token(cfg.seed, 'map-png')}.png"
        cv2.imwrite(str(tmp / map_png), map_mask(world))
        _write_json(tmp / "maps" / "expansion" / f"{MAP_NAME}.json", build_map_expansion(world))
        tables = build_tables(cfg, world, plans, map_png)
        for name, rows in tables.items():
            _write_json(vdir / f"{name}.json", rows, indent=0)
        split = _split(cfg, [p.name for p in plans])
        _write_json(vdir / "bevctl_splits.json", split, indent=1)
        _write_json(vdir / "bevctl_world.json", world_json(world))
        _write_json(tmp / "semantic" / "classes.json", {"classes": list(SYNTH_CLASSES)}, indent=1)
        lidar = _lidar_bytes()
        for plan in plans:
            for k in range(len(plan.sample_times_us)):
                (tmp / lidar_relpath(cfg, plan, k)).write_bytes(lidar)

        jobs = [
            (s, list(range(a, min(a + cfg.chunk, cfg.samples_per_scene))))
            for s in range(cfg.scenes)
            for a in range(0, cfg.samples_per_scene, cfg.chunk)
        ]
        total = cfg.scenes * cfg.samples_per_scene
        workers = cfg.workers or min(os.cpu_count() or 1, len(jobs))
        cfg_dict = asdict(cfg)
        with Progress(
            TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"), TimeElapsedColumn(),
            disable=not progress,
        ) as bar:
            task = bar.add_task("render", total=total)
            if workers <= 1:
                for s, ks in jobs:
                    bar.advance(task, _render_job(cfg_dict, s, ks, str(tmp)))
                _JOB_CACHE.clear()
            else:
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
                try:
                    futs = [pool.submit(_render_job, cfg_dict, s, ks, str(tmp)) for s, ks in jobs]
                    for f in futs:
                        bar.advance(task, f.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # running chunks finish (~1 s)
                    raise
                pool.shutdown()
        # atomic publish
        if out.exists():
            trash = out.parent / f".{out.name}.synth-old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {
        "out": str(out),
        "version": cfg.version,
        "scenes": cfg.scenes,
        "samples": cfg.scenes * cfg.samples_per_scene,
        "images": cfg.scenes * cfg.samples_per_scene * len(SYNTH_CAMERAS),
        "image_hw": list(cfg.image_hw),
        "annotations": len(tables["sample_annotation"]),
        "split": {k: len(v) for k, v in split.items()},
        "seconds": round(time.time() - t_start, 2),
    }
    log.info(
        "synth: wrote %d scenes x %d samples (%d images %dx%d, %d box annotations) to %s in %.1f s",
        cfg.scenes, cfg.samples_per_scene, summary["images"], cfg.image_hw[0], cfg.image_hw[1],
        summary["annotations"], out, summary["seconds"],
    )
    return summary


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    path.write_text(json.dumps(obj, indent=indent, separators=(",", ":") if indent is None else None))


