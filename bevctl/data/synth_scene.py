"""One synthetic scene: the ego route, timestamps, camera rig and the other vehicles.

Everything is a pure function of (world, config, scene index), so the main process (tables)
and the render workers (images) compute the same plan independently.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bevctl.data.synth_map import connector_path, edge_point, heading_street, lane_lateral, neighbour
from bevctl.data.synth_world import World, street_to_local

# nuScenes channel order of the six cameras (as the sensors table lists them).
SYNTH_CAMERAS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_RIGHT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_FRONT_LEFT",
)
# camera trigger offsets after the LIDAR_TOP keyframe time (microseconds), like nuScenes
CAM_OFFSET_US = {
    "CAM_FRONT": 10_000,
    "CAM_FRONT_RIGHT": 18_500,
    "CAM_BACK_RIGHT": 27_000,
    "CAM_BACK": 35_500,
    "CAM_BACK_LEFT": -16_500,
    "CAM_FRONT_LEFT": 1_500,
}
LIDAR_T_EGO = (0.943713, 0.0, 1.84023)  # LIDAR_TOP position in the ego frame
RIG_PATH = Path(__file__).resolve().parents[1] / "assets" / "nuscenes_rig.json"


def load_rig() -> dict:
    return json.loads(RIG_PATH.read_text())


def quat_to_rot(q) -> np.ndarray:
    w, x, y, z = q
    n = math.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def rot_to_quat(r: np.ndarray) -> list[float]:
    """Rotation matrix -> unit quaternion [w, x, y, z] with w >= 0."""
    m = r
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    q = q / np.linalg.norm(q)
    if q[0] < 0:
        q = -q
    return [float(v) for v in q]


def yaw_quat(yaw: float) -> list[float]:
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


@dataclass
class Camera:
    channel: str
    pix_T_cam: np.ndarray  # (3, 3) for the synthetic image size
    ego_T_cam: np.ndarray  # (4, 4)


@dataclass
class Vehicle:
    category: str
    size: tuple[float, float, float]  # (width, length, height) like nuScenes
    p0: np.ndarray  # (2,) local position at t_ref
    heading: float  # local yaw
    speed: float  # m/s along heading (0: parked)
    color: tuple[int, int, int]
    t_ref: float  # seconds since scene start

    def local_pose(self, t: float) -> tuple[np.ndarray, float]:
        d = np.array([math.cos(self.heading), math.sin(self.heading)])
        return self.p0 + d * self.speed * (t - self.t_ref), self.heading


@dataclass
class ScenePlan:
    index: int
    name: str
    t0_us: int
    sample_times_us: list[int]  # LIDAR_TOP keyframe timestamps
    cameras: list[Camera]  # in SYNTH_CAMERAS order
    path_xy: np.ndarray  # (N, 2) local
    path_yaw: np.ndarray  # (N,)
    path_s: np.ndarray  # (N,) arc length
    path_t: np.ndarray  # (N,) time (s) at which the ego passes each path vertex
    t_start: float  # path time at the scene start
    speed: float  # cruise speed (m/s); slower in turns
    vehicles: list[Vehicle]
    style: dict  # per-scene rendering style

    def cam_time_us(self, sample: int, channel: str) -> int:
        jitter = int((hash_int(self.index, sample, channel) % 3001) - 1500)
        return self.sample_times_us[sample] + CAM_OFFSET_US[channel] + jitter

    def ego_local(self, t_us: int) -> tuple[np.ndarray, float]:
        t = self.t_start + (t_us - self.t0_us) * 1e-6
        s = float(np.interp(t, self.path_t, self.path_s))
        xy = np.array([np.interp(s, self.path_s, self.path_xy[:, 0]), np.interp(s, self.path_s, self.path_xy[:, 1])])
        yaw = float(np.interp(s, self.path_s, self.path_yaw))
        return xy, yaw

    def global_T_ego(self, world: World, t_us: int) -> np.ndarray:
        xy, yaw = self.ego_local(t_us)
        gx, gy = world.to_global(np.array(xy[0]), np.array(xy[1]))
        return pose_matrix(float(gx), float(gy), 0.0, yaw + world.theta)


def pose_matrix(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    m = np.eye(4)
    m[:2, :2] = [[c, -s], [s, c]]
    m[:3, 3] = [x, y, z]
    return m


def hash_int(*parts: object) -> int:
    return int.from_bytes(hashlib.md5("/".join(map(str, parts)).encode()).digest()[:8], "little")


def _small_rotation(rng: np.random.Generator, sigma_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    ang = math.radians(rng.normal(0.0, sigma_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(ang) * k + (1 - math.cos(ang)) * (k @ k)


def make_rig(rng: np.random.Generator, image_hw: tuple[int, int], perturb: bool = True) -> list[Camera]:
    rig = load_rig()
    h, w = image_hw
    sx, sy = w / rig["image_size"]["width"], h / rig["image_size"]["height"]
    cams = []
    for ch in SYNTH_CAMERAS:
        c = rig["cameras"][ch]
        k = np.array(c["camera_intrinsic"], np.float64)
        pix = np.array(
            [
                [k[0, 0] * sx, 0.0, (k[0, 2] + 0.5) * sx - 0.5],
                [0.0, k[1, 1] * sy, (k[1, 2] + 0.5) * sy - 0.5],
                [0.0, 0.0, 1.0],
            ]
        )
        r = quat_to_rot(c["rotation"])
        t = np.array(c["translation"], np.float64)
        if perturb:
            r = _small_rotation(rng, 0.6) @ r
            t = t + rng.normal(0.0, 0.02, size=3)
        e = np.eye(4)
        e[:3, :3] = r
        e[:3, 3] = t
        cams.append(Camera(ch, pix, e))
    return cams


# --------------------------------------------------------------------------------------------
# Route
# --------------------------------------------------------------------------------------------


def _route(world: World, rng: np.random.Generator, length: float):
    """Random lane-following route (local polyline) with turns at intersections."""
    n_i, n_j = len(world.rows.c), len(world.cols.c)
    while True:
        i, j, h = int(rng.integers(n_i)), int(rng.integers(n_j)), int(rng.integers(4))
        if neighbour(world, i, j, h) is not None:
            break
    kind, k, _ = heading_street(h, i, j)
    q = int(rng.integers(int(world.street(kind).n[k])))
    pts, yaws, segs = [], [], []
    total = 0.0
    first_len = None
    while total < length:
        nxt = neighbour(world, i, j, h)
        p0 = edge_point(world, i, j, h, q, entering=False)
        p1 = edge_point(world, nxt[0], nxt[1], h, q, entering=True)
        sp, sy, _ = connector_path(p0, h, p1, h)
        seg_len = float(np.linalg.norm(p1 - p0))
        if first_len is None:
            first_len = seg_len
        kind, k, sigma = heading_street(h, i, j)
        segs.append((kind, k, sigma, p0, p1))
        pts.append(sp), yaws.append(sy)
        total += seg_len
        i, j = nxt
        options = [h2 for h2 in (h, (h + 1) % 4, (h + 3) % 4) if neighbour(world, i, j, h2) is not None]
        weights = np.array([2.0 if h2 == h else 1.0 for h2 in options])
        h2 = int(options[rng.choice(len(options), p=weights / weights.sum())])
        kind2, k2, _ = heading_street(h2, i, j)
        q2 = min(q, int(world.street(kind2).n[k2]) - 1)
        c0 = edge_point(world, i, j, h, q, entering=True)
        c1 = edge_point(world, i, j, h2, q2, entering=False)
        cp, cy, _ = connector_path(c0, h, c1, h2)
        pts.append(cp), yaws.append(cy)
        total += float(np.sum(np.linalg.norm(np.diff(cp, axis=0), axis=1)))
        h, q = h2, q2
    xy = np.concatenate(pts)
    yaw = np.unwrap(np.concatenate(yaws))
    keep = np.concatenate([[True], np.linalg.norm(np.diff(xy, axis=0), axis=1) > 1e-6])
    xy, yaw = xy[keep], yaw[keep]
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
    return xy, yaw, s, segs, first_len


def _vehicles(world: World, rng: np.random.Generator, segs, ego_fn, times: np.ndarray) -> list[Vehicle]:
    palette = [(200, 200, 205), (30, 30, 35), (150, 20, 25), (20, 50, 120), (235, 235, 235), (110, 110, 115), (60, 90, 60), (180, 150, 40)]
    cands: list[Vehicle] = []
    t_mid = float(times.mean())
    for kind, k, _sigma, p0, p1 in segs:
        st = world.street(kind)
        n = int(st.n[k])
        for _ in range(int(rng.poisson(6.0))):
            sig = float(rng.choice([-1.0, 1.0]))
            parked = rng.random() < 0.35
            q = n - 1 if parked else int(rng.integers(n))
            lat = lane_lateral(world, kind, k, sig, q)
            if parked:
                lat += sig * 0.6  # towards the kerb (lanes lie left of the centre line, SIDE=+1)
            frac = float(rng.uniform(0.05, 0.95))
            a_lo = float(p0[1] if kind == "col" else p0[0])
            a_hi = float(p1[1] if kind == "col" else p1[0])
            a = a_lo + frac * (a_hi - a_lo)
            pos = np.array(street_to_local(world, kind, k, a, lat))
            head_vec = np.array([0.0, sig]) if kind == "col" else np.array([sig, 0.0])
            heading = math.atan2(head_vec[1], head_vec[0])
            truck = rng.random() < 0.12
            size = (
                (float(rng.uniform(2.3, 2.5)), float(rng.uniform(6.5, 9.0)), float(rng.uniform(2.8, 3.4)))
                if truck
                else (float(rng.uniform(1.75, 2.0)), float(rng.uniform(4.1, 4.9)), float(rng.uniform(1.45, 1.75)))
            )
            speed = 0.0 if parked else float(rng.uniform(3.0, 11.0))
            color = palette[int(rng.integers(len(palette)))]
            cands.append(Vehicle("vehicle.truck" if truck else "vehicle.car", size, pos, heading, speed, color, t_mid))
    kept: list[Vehicle] = []
    ego = [ego_fn(t) for t in times]
    for v in cands:
        ok = True
        for ti, t in enumerate(times):
            pv, _ = v.local_pose(t)
            exy, eyaw = ego[ti]
            ec = exy + 1.4 * np.array([math.cos(eyaw), math.sin(eyaw)])
            if np.linalg.norm(pv - ec) < v.size[1] / 2 + 4.0:
                ok = False
                break
            for u in kept:
                pu, _ = u.local_pose(t)
                if np.linalg.norm(pv - pu) < (v.size[1] + u.size[1]) / 2 + 1.0:
                    ok = False
                    break
            if not ok:
                break
            # stay inside the world
            if not (0 < pv[0] < world.size[0] and 0 < pv[1] < world.size[1]):
                ok = False
                break
        if ok:
            kept.append(v)
    return kept


def _speed_profile(yaw: np.ndarray, s: np.ndarray, cruise: float, rng: np.random.Generator) -> np.ndarray:
    """Path time per vertex: cruise speed with slow variation, capped by lateral acceleration in
    turns (<= 3 m/s^2) and by longitudinal acceleration / braking (<= 1.5 / 2.5 m/s^2)."""
    ds = np.diff(s)
    kappa = np.zeros_like(s)
    kappa[1:] = np.abs(np.diff(yaw)) / np.maximum(ds, 1e-9)
    # spread the curvature a little so the speed limit covers the whole turn
    k = np.convolve(kappa, np.ones(9) / 9.0, mode="same")
    kappa = np.maximum(kappa, k)
    phase = float(rng.uniform(0, 2 * np.pi))
    v = cruise * (1.0 + 0.08 * np.sin(s / 40.0 + phase))
    v = np.minimum(v, np.sqrt(3.0 / np.maximum(kappa, 1e-6)))
    v = np.maximum(v, 3.5)
    for i in range(1, len(v)):  # acceleration limit
        v[i] = min(v[i], math.sqrt(v[i - 1] ** 2 + 2 * 1.5 * ds[i - 1]))
    for i in range(len(v) - 2, -1, -1):  # braking limit
        v[i] = min(v[i], math.sqrt(v[i + 1] ** 2 + 2 * 2.5 * ds[i]))
    return np.concatenate([[0.0], np.cumsum(ds / (0.5 * (v[1:] + v[:-1])))])


def plan_scene(world: World, seed: int, index: int, samples: int, image_hw: tuple[int, int]) -> ScenePlan:
    rng = np.random.default_rng([seed, 2002, index])
    speed = float(rng.uniform(5.0, 12.0))
    duration = (samples - 1) * 0.5 + 0.2
    length = speed * duration * 1.15 + 60.0
    xy, yaw, s, segs, first_len = _route(world, rng, length)
    s0 = float(rng.uniform(0.0, 0.6 * first_len))
    path_t = _speed_profile(yaw, s, speed, rng)
    t0_us = 1_533_000_000_000_000 + (seed % 1000) * 10_000_000_000 + index * 100_000_000
    sample_times = [t0_us + k * 500_000 + int(rng.integers(-2000, 2001)) * (k > 0) for k in range(samples)]
    cams = make_rig(rng, image_hw)
    plan = ScenePlan(
        index=index,
        name=f"scene-{index + 1:04d}",
        t0_us=t0_us,
        sample_times_us=sample_times,
        cameras=cams,
        path_xy=xy,
        path_yaw=yaw,
        path_s=s,
        path_t=path_t,
        t_start=float(np.interp(s0, s, path_t)),
        speed=speed,
        vehicles=[],
        style={},
    )
    times = np.array([(t - t0_us) * 1e-6 for t in sample_times])
    plan.vehicles = _vehicles(world, rng, segs, lambda t: plan.ego_local(t0_us + int(t * 1e6)), times)
    plan.style = dict(
        brightness=float(rng.uniform(0.7, 1.2)),
        tint=[float(v) for v in rng.uniform(0.9, 1.1, size=3)],
        asphalt=float(rng.uniform(70, 115)),
        grass=[float(v) for v in rng.uniform([55, 80, 35], [110, 130, 70])],
        sidewalk=float(rng.uniform(140, 185)),
        paint=float(rng.uniform(190, 240)),
        fog=float(rng.uniform(120, 400)),
        sky_top=[float(v) for v in rng.uniform([60, 100, 160], [140, 170, 230])],
        sky_horizon=[float(v) for v in rng.uniform([170, 180, 190], [230, 230, 235])],
        noise=float(rng.uniform(2.0, 6.0)),
        jpeg_quality=int(rng.integers(80, 96)),
        sun=[float(v) for v in _unit(rng.normal([0.3, 0.4, 0.9], 0.3))],
    )
    return plan


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    v[2] = abs(v[2]) + 0.2
    return v / np.linalg.norm(v)
