"""Exact ray casting of the synthetic world into one camera (vectorised numpy).

Each pixel centre's ray (nuScenes convention: pixel centres at integer coordinates) hits the
ground plane z = 0, a vehicle box (slab test), or the sky. The label is the class of the first
hit; the colour adds texture, paint wear, lighting, haze and sensor noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bevctl.data.synth_scene import Camera, ScenePlan
from bevctl.data.synth_world import (
    CURB,
    OTHER,
    PAINT_NONE,
    PAINT_WHITE,
    PAINT_YELLOW,
    ROAD,
    SIDEWALK,
    SKY,
    VEHICLE,
    World,
)

MAX_RANGE = 2000.0  # ground hits beyond this distance count as sky (horizon)
TILE = 256


@dataclass
class CameraRays:
    """Per scene-camera precomputation: pixel rays in the ego frame and their ground hits."""

    h: int
    w: int
    origin: np.ndarray  # (3,) camera centre in ego
    dirs: np.ndarray  # (N, 3) float64 ray directions in ego (camera z = 1 scaling)
    ground: np.ndarray  # (N,) bool: ray hits the ground within MAX_RANGE
    t_ground: np.ndarray  # (N,) ray parameter of the ground hit (inf where none)
    gxy: np.ndarray  # (N, 2) ground hit in ego (x, y)
    elev: np.ndarray  # (N,) float32 sine of the ray elevation
    norm: np.ndarray  # (N,) |dir|


def camera_rays(cam: Camera, h: int, w: int) -> CameraRays:
    v, u = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    uv1 = np.stack([u.ravel(), v.ravel(), np.ones(h * w)], axis=1)
    d_cam = uv1 @ np.linalg.inv(cam.pix_T_cam).T
    r = cam.ego_T_cam[:3, :3]
    o = cam.ego_T_cam[:3, 3].copy()
    d = d_cam @ r.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d[:, 2] < -1e-9, -o[2] / d[:, 2], np.inf)
    norm = np.linalg.norm(d, axis=1)
    ground = np.isfinite(t) & (t * norm < MAX_RANGE)
    t = np.where(ground, t, np.inf)
    gxy = o[None, :2] + np.where(ground, t, 0.0)[:, None] * d[:, :2]
    return CameraRays(h, w, o, d, ground, t, gxy, (d[:, 2] / norm).astype(np.float32), norm)


def noise_tiles(seed: int) -> np.ndarray:
    """(3, TILE, TILE) float32 smooth noise in about [-1, 1], periodic (seeded)."""
    import cv2

    rng = np.random.default_rng([seed, 3003])
    out = []
    for sigma in (1.5, 4.0, 12.0):
        base = rng.normal(size=(TILE, TILE)).astype(np.float32)
        big = np.tile(base, (3, 3))
        blur = cv2.GaussianBlur(big, (0, 0), sigma)[TILE : 2 * TILE, TILE : 2 * TILE]
        out.append(blur / (blur.std() * 2.5 + 1e-6))
    return np.clip(np.stack(out), -1.0, 1.0)


def _lookup(tile: np.ndarray, x: np.ndarray, y: np.ndarray, res: float) -> np.ndarray:
    ix = np.floor(x / res).astype(np.int64) % TILE
    iy = np.floor(y / res).astype(np.int64) % TILE
    return tile[iy, ix]


def _box_hits(rays: CameraRays, cam: Camera, boxes, idx: np.ndarray | None = None):
    """Nearest box hit per ray: (t (N,), box id (N,), face normal in ego (N, 3), height (N,))."""
    n = rays.dirs.shape[0]
    t_best = np.full(n, np.inf)
    bid = np.full(n, -1, np.int64)
    normal = np.zeros((n, 3), np.float32)
    zrel = np.zeros(n, np.float32)
    cam_T_ego = np.linalg.inv(cam.ego_T_cam)
    o = rays.origin
    for b, (centre, yaw, size) in enumerate(boxes):
        wid, length, height = size
        c, s = math.cos(yaw), math.sin(yaw)
        ext = np.array([length / 2, wid / 2, height / 2])
        ctr = np.array([centre[0], centre[1], height / 2])
        # pixel window from the projected corners
        corners = np.array([[sx * ext[0], sy * ext[1], sz * ext[2]] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        cw = corners @ rot.T + ctr
        pc = cw @ cam_T_ego[:3, :3].T + cam_T_ego[:3, 3]
        if np.all(pc[:, 2] <= 0.05):
            continue
        if np.all(pc[:, 2] > 0.05):
            uv = pc @ cam.pix_T_cam.T
            uv = uv[:, :2] / uv[:, 2:3]
            u0, v0 = np.floor(uv.min(0)).astype(int)
            u1, v1 = np.ceil(uv.max(0)).astype(int)
            u0, v0 = max(u0, 0), max(v0, 0)
            u1, v1 = min(u1, rays.w - 1), min(v1, rays.h - 1)
            if u1 < u0 or v1 < v0:
                continue
            rr, cc = np.meshgrid(np.arange(v0, v1 + 1), np.arange(u0, u1 + 1), indexing="ij")
            sel = (rr * rays.w + cc).ravel()
        else:
            sel = np.arange(n)
        d = rays.dirs[sel]
        ob = rot.T @ (o - ctr)
        db = d @ rot  # (M, 3) in box frame (rot.T applied to row vectors)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / db
            t1 = (-ext - ob) * inv
            t2 = (ext - ob) * inv
        tmin = np.minimum(t1, t2)
        tmax = np.maximum(t1, t2)
        tmin = np.where(np.isnan(tmin), -np.inf, tmin)
        tmax = np.where(np.isnan(tmax), np.inf, tmax)
        tnear = tmin.max(1)
        tfar = tmax.min(1)
        hit = (tnear <= tfar) & (tnear > 0) & (tnear < t_best[sel])
        if not hit.any():
            continue
        hs = sel[hit]
        t_best[hs] = tnear[hit]
        bid[hs] = b
        axis = tmin[hit].argmax(1)
        sign = -np.sign(db[hit, axis])
        nb = np.zeros((hs.size, 3))
        nb[np.arange(hs.size), axis] = sign
        normal[hs] = (nb @ rot.T).astype(np.float32)
        zrel[hs] = ((o[2] + tnear[hit] * d[hit, 2]) / height).astype(np.float32)
    return t_best, bid, normal, zrel


def render(
    world: World,
    plan: ScenePlan,
    cam_idx: int,
    rays: CameraRays,
    tiles: np.ndarray,
    t_us: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image: (rgb uint8 (H, W, 3), class ids uint8 (H, W))."""
    st = plan.style
    cam = plan.cameras[cam_idx]
    exy, eyaw = plan.ego_local(t_us)
    c, s = math.cos(eyaw), math.sin(eyaw)
    n = rays.dirs.shape[0]
    g = rays.ground
    lx = np.zeros(n)
    ly = np.zeros(n)
    lx[g] = c * rays.gxy[g, 0] - s * rays.gxy[g, 1] + exy[0]
    ly[g] = s * rays.gxy[g, 0] + c * rays.gxy[g, 1] + exy[1]
    cls = np.full(n, SKY, np.uint8)
    paint = np.zeros(n, np.uint8)
    zebra = np.zeros(n, bool)
    cg, pg, zg = world.classify_local(lx[g], ly[g])
    cls[g], paint[g], zebra[g] = cg, pg, zg

    # vehicles at this camera time, in the ego frame
    t_s = (t_us - plan.t0_us) * 1e-6
    boxes, colors = [], []
    for v in plan.vehicles:
        p, yaw = v.local_pose(t_s)
        d = p - exy
        if d @ d > 150.0**2:
            continue
        ex = np.array([c * d[0] + s * d[1], -s * d[0] + c * d[1]])
        boxes.append((ex, yaw - eyaw, v.size))
        colors.append(v.color)
    tb, bid, bnormal, bz = _box_hits(rays, cam, boxes)
    veh = tb < rays.t_ground
    cls[veh] = VEHICLE

    # ---- colour -------------------------------------------------------------------------------
    col = np.zeros((n, 3), np.float32)
    fine = _lookup(tiles[0], lx, ly, 0.04)
    mid = _lookup(tiles[1], lx, ly, 0.15)
    coarse = _lookup(tiles[2], lx, ly, 1.0)
    asphalt = st["asphalt"] * (1.0 + 0.10 * fine + 0.07 * mid + 0.08 * coarse)
    gray = np.stack([asphalt, asphalt, asphalt * 1.03], 1)
    m = cls == ROAD
    col[m] = gray[m]
    # ground classes other than road
    m = cls == CURB
    col[m] = (st["sidewalk"] + 15) * (1.0 + 0.06 * fine[m, None])
    m = cls == SIDEWALK
    seam = ((np.mod(lx, 0.6) < 0.035) | (np.mod(ly, 0.6) < 0.035))[m]
    sw = st["sidewalk"] * (1.0 + 0.05 * fine[m] + 0.05 * coarse[m]) * np.where(seam, 0.8, 1.0)
    col[m] = np.stack([sw * 1.02, sw * 0.97, sw * 0.93], 1)
    m = cls == OTHER
    grass = np.array(st["grass"], np.float32)
    col[m] = grass[None] * (1.0 + 0.15 * coarse[m, None] + 0.10 * mid[m, None])
    # paint (lane, divider, zebra stripes, stop lines) over asphalt, with wear
    wear = np.clip(0.85 + 0.3 * mid - 0.25 * np.maximum(coarse, 0.0), 0.45, 1.0)
    for code, rgb in ((PAINT_WHITE, (1.0, 1.0, 0.98)), (PAINT_YELLOW, (0.95, 0.75, 0.2))):
        m = (paint == code) & g & ~veh
        pc = st["paint"] * np.array(rgb, np.float32)
        a = wear[m, None]
        col[m] = a * pc[None] + (1 - a) * gray[m]
    # vehicles: flat-shaded boxes with darker windows
    if veh.any():
        vcol = np.array(colors, np.float32)[bid[veh]]
        sun = np.array(st["sun"], np.float32)
        lam = 0.45 + 0.55 * np.clip(bnormal[veh] @ sun, 0.0, 1.0)
        side = np.abs(bnormal[veh, 2]) < 0.5
        window = side & (bz[veh] > 0.55) & (bz[veh] < 0.9)
        vcol = np.where(window[:, None], vcol * 0.25 + 15, vcol)
        col[veh] = vcol * lam[:, None]
    # haze with distance, sky gradient
    dist = np.where(veh, tb, rays.t_ground) * rays.norm
    hz = np.array(st["sky_horizon"], np.float32)
    top = np.array(st["sky_top"], np.float32)
    hit = g | veh
    f = np.exp(-np.where(hit, dist, 0.0) / st["fog"]).astype(np.float32)[:, None]
    col = np.where(hit[:, None], f * col + (1 - f) * hz[None], col)
    e = np.clip(rays.elev, 0.0, 1.0)[:, None] ** 0.6
    sky = (1 - e) * hz[None] + e * top[None]
    col = np.where(hit[:, None], col, sky)
    col *= st["brightness"] * np.array(st["tint"], np.float32)[None] * float(rng.uniform(0.95, 1.05))
    col += rng.normal(0.0, st["noise"], size=col.shape).astype(np.float32)
    rgb = np.clip(col, 0, 255).astype(np.uint8).reshape(rays.h, rays.w, 3)
    return rgb, cls.reshape(rays.h, rays.w)
