"""Exact ray casting of the synthetic world into one camera (vectorised numpy).

Each pixel centre's ray (nuScenes convention: pixel centres at integer coordinates) hits the
ground plane z = 0, a vehicle box (slab test), or the sky. The label is the class of the first
hit; the colour adds texture, paint wear, lighting, haze and sensor noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from bevctl.data.synth_scene import Camera, ScenePlan
from bevctl.data.synth_world import (
    CROSSWALK,
    CURB,
    LANE,
    OTHER,
    PAINT_WHITE,
    PAINT_YELLOW,
    ROAD,
    SIDEWALK,
    SKY,
    STOP,
    VEHICLE,
    YELLOW,
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
    sky: np.ndarray | None = None  # (N, 3) float32 sky colours, filled by the first render


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
    rng = np.random.default_rng([seed, 3003])
    out = []
    for sigma in (1.5, 4.0, 12.0):
        base = rng.normal(size=(TILE, TILE)).astype(np.float32)
        big = np.tile(base, (3, 3))
        blur = cv2.GaussianBlur(big, (0, 0), sigma)[TILE : 2 * TILE, TILE : 2 * TILE]
        out.append(blur / (blur.std() * 2.5 + 1e-6))
    return np.clip(np.stack(out), -1.0, 1.0)


def _lookup(tile: np.ndarray, x: np.ndarray, y: np.ndarray, res: float) -> np.ndarray:
    """Periodic nearest lookup (local coordinates are >= 0 inside the world)."""
    ix = (x * (1.0 / res)).astype(np.int32) & (TILE - 1)
    iy = (y * (1.0 / res)).astype(np.int32) & (TILE - 1)
    return tile[iy, ix]


def _palette(st: dict):
    """Per-class base colours (10, 3), texture weights (3, 10), paint colours (3, 3), sky colours."""
    pal = np.zeros((10, 3), np.float32)
    a = st["asphalt"]
    for c in (ROAD, LANE, YELLOW, CROSSWALK, STOP):
        pal[c] = (a, a, a * 1.03)
    pal[CURB] = st["sidewalk"] + 15
    sw = st["sidewalk"]
    pal[SIDEWALK] = (sw * 1.02, sw * 0.97, sw * 0.93)
    pal[OTHER] = st["grass"]
    tex = np.zeros((3, 10), np.float32)
    tex[:, [ROAD, LANE, YELLOW, CROSSWALK, STOP]] = np.array([[0.10], [0.07], [0.08]])
    tex[:, CURB] = (0.06, 0.0, 0.0)
    tex[:, SIDEWALK] = (0.05, 0.0, 0.05)
    tex[:, OTHER] = (0.0, 0.10, 0.15)
    paint = np.zeros((3, 3), np.float32)
    paint[PAINT_WHITE] = st["paint"] * np.array((1.0, 1.0, 0.98))
    paint[PAINT_YELLOW] = st["paint"] * np.array((0.95, 0.75, 0.2))
    return pal, tex, paint, np.array(st["sky_horizon"], np.float32), np.array(st["sky_top"], np.float32)


BODY_LOWER, BODY_CABIN, TRUCK_CAB, TRUCK_CARGO = range(4)


def vehicle_parts(xy: np.ndarray, yaw: float, size, category: str) -> list[tuple]:
    """Boxes ``(centre (3,), yaw, half extents (3,), part)`` of one vehicle in the ego frame.

    A car is a lower body plus a narrower cabin; a truck is a cab plus a cargo box. All parts
    lie inside the annotated box ``size = (width, length, height)`` centred at ``xy``.
    """
    wid, length, height = size
    fwd = np.array([math.cos(yaw), math.sin(yaw)])

    def part(along0: float, along1: float, z0: float, z1: float, half_w: float, kind: int):
        c = xy + fwd * (along0 + along1) / 2
        return (np.array([c[0], c[1], (z0 + z1) / 2]), yaw, np.array([(along1 - along0) / 2, half_w, (z1 - z0) / 2]), kind)

    if category.startswith("vehicle.truck"):
        return [
            part(length / 2 - 2.0, length / 2, 0.0, 0.8 * height, wid / 2, TRUCK_CAB),
            part(-length / 2, length / 2 - 2.2, 0.0, height, wid / 2, TRUCK_CARGO),
        ]
    return [
        part(-length / 2, length / 2, 0.0, 0.55 * height, wid / 2, BODY_LOWER),
        part(-0.33 * length, 0.17 * length, 0.55 * height, height, 0.44 * wid, BODY_CABIN),
    ]


def _box_hits(rays: CameraRays, cam: Camera, boxes):
    """Nearest box hit per ray: (t (N,), box id (N,), face normal in ego (N, 3), relative height
    (N,), [(box id, pixel indices of its projected window)])."""
    n = rays.dirs.shape[0]
    t_best = np.full(n, np.inf)
    bid = np.full(n, -1, np.int64)
    normal = np.zeros((n, 3), np.float32)
    zrel = np.zeros(n, np.float32)
    windows = []
    cam_T_ego = np.linalg.inv(cam.ego_T_cam)
    o = rays.origin
    for b, (ctr, yaw, ext, _part) in enumerate(boxes):
        height = 2 * ext[2]
        c, s = math.cos(yaw), math.sin(yaw)
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
        windows.append((b, sel))
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
        zrel[hs] = ((o[2] + tnear[hit] * d[hit, 2] - (ctr[2] - ext[2])) / height).astype(np.float32)
    return t_best, bid, normal, zrel, windows


def render(
    world: World,
    plan: ScenePlan,
    cam_idx: int,
    rays: CameraRays,
    tiles: np.ndarray,
    t_us: int,
    rng: np.random.Generator,
    noise: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image: (rgb uint8 (H, W, 3), class ids uint8 (H, W)).

    ``noise``: optional float32 buffer of standard normals (longer than H*W*3) to draw sensor
    noise from at a random offset (much cheaper than fresh normals per image).
    """
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
    cls[g], paint[g] = world.classify_local(lx[g], ly[g])

    # vehicles at this camera time, in the ego frame
    t_s = (t_us - plan.t0_us) * 1e-6
    boxes, colors, footprints = [], [], []
    for v in plan.vehicles:
        p, yaw = v.local_pose(t_s)
        d = p - exy
        if d @ d > 150.0**2:
            continue
        ex = np.array([c * d[0] + s * d[1], -s * d[0] + c * d[1]])
        for part in vehicle_parts(ex, yaw - eyaw, v.size, v.category):
            boxes.append(part)
            colors.append(v.color)
            footprints.append((ex, yaw - eyaw, v.size))
    tb, bid, bnormal, bz, windows = _box_hits(rays, cam, boxes)
    veh = tb < rays.t_ground
    cls[veh] = VEHICLE

    # ---- colour -------------------------------------------------------------------------------
    pal, tex_w, paint_pal, hz, top = _palette(st)
    if rays.sky is None:
        e = np.clip(rays.elev, 0.0, 1.0)[:, None] ** 0.6
        rays.sky = ((1 - e) * hz[None] + e * top[None]).astype(np.float32)
    out = rays.sky.copy()
    gi = np.flatnonzero(g & ~veh)
    if gi.size:
        x, y = lx[gi].astype(np.float32), ly[gi].astype(np.float32)
        fine = _lookup(tiles[0], x, y, 0.04)
        mid = _lookup(tiles[1], x, y, 0.15)
        coarse = _lookup(tiles[2], x, y, 1.0)
        cg, pg = cls[gi], paint[gi]
        tex = 1.0 + tex_w[0][cg] * fine + tex_w[1][cg] * mid + tex_w[2][cg] * coarse
        sw = np.flatnonzero(cg == SIDEWALK)
        if sw.size:
            seam = (np.mod(x[sw], 0.6) < 0.035) | (np.mod(y[sw], 0.6) < 0.035)
            tex[sw[seam]] *= 0.8
        # soft contact shadows under the vehicles (texture only; the label stays the ground's)
        for b, sel in windows:
            if boxes[b][3] in (BODY_CABIN, TRUCK_CARGO):
                continue  # one shadow per vehicle (from its lower / main part)
            centre, yaw_b, (wid, length, _h) = footprints[b]
            sel = sel[g[sel] & ~veh[sel]]
            if not sel.size:
                continue
            dxy = rays.gxy[sel] - centre[None]
            cb, sb = math.cos(yaw_b), math.sin(yaw_b)
            u = np.abs(cb * dxy[:, 0] + sb * dxy[:, 1]) - length / 2
            v = np.abs(-sb * dxy[:, 0] + cb * dxy[:, 1]) - wid / 2
            dout = np.maximum(np.maximum(u, v), 0.0)
            shade = 1.0 - 0.5 * np.clip(1.0 - dout / 0.35, 0.0, 1.0)
            pos = np.searchsorted(gi, sel)
            tex[pos] *= shade.astype(np.float32)
        col = pal[cg] * tex[:, None]
        pm = np.flatnonzero(pg)
        if pm.size:
            a = np.clip(0.85 + 0.3 * mid[pm] - 0.25 * np.maximum(coarse[pm], 0.0), 0.45, 1.0)[:, None]
            col[pm] = a * paint_pal[pg[pm]] + (1 - a) * col[pm]
        out[gi] = col
    vi = np.flatnonzero(veh)
    if vi.size:
        vcol = np.array(colors, np.float32)[bid[vi]]
        part = np.array([b[3] for b in boxes])[bid[vi]]
        sun = np.array(st["sun"], np.float32)
        nv = bnormal[vi]
        z = bz[vi]
        lam = 0.45 + 0.55 * np.clip(nv @ sun, 0.0, 1.0)
        side = np.abs(nv[:, 2]) < 0.5
        glass = side & (
            ((part == BODY_CABIN) & (z > 0.08) & (z < 0.92)) | ((part == TRUCK_CAB) & (z > 0.55) & (z < 0.9))
        )
        dark = side & (((part == BODY_LOWER) & (z < 0.3)) | ((part != BODY_CABIN) & (z < 0.12)))
        vcol[glass] = np.array((40, 48, 58), np.float32) + 0.15 * vcol[glass]
        vcol[dark] = 22.0  # wheels / shadowed skirt
        out[vi] = vcol * lam[:, None]
    # haze with distance
    hi = np.flatnonzero(g | veh)
    dist = np.where(veh[hi], tb[hi], rays.t_ground[hi]) * rays.norm[hi]
    f = np.exp(-dist / st["fog"]).astype(np.float32)[:, None]
    out[hi] = hz[None] + f * (out[hi] - hz[None])
    out *= (st["brightness"] * float(rng.uniform(0.95, 1.05))) * np.array(st["tint"], np.float32)[None]
    if noise is not None:
        off = int(rng.integers(0, noise.size - out.size))
        out += noise[off : off + out.size].reshape(out.shape) * st["noise"]
    else:
        out += rng.standard_normal(out.shape, dtype=np.float32) * st["noise"]
    np.clip(out, 0, 255, out=out)
    rgb = out.astype(np.uint8).reshape(rays.h, rays.w, 3)
    if min(rays.h, rays.w) >= 64:  # mild optical blur
        rgb = cv2.GaussianBlur(rgb, (3, 3), 0.6)
    return rgb, cls.reshape(rays.h, rays.w)
