"""The synthetic world: devkit-loadable, self-consistent (map vs images), deterministic, safe."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from bevctl.data.synth import SYNTH_CLASSES, SynthConfig, parse_hw, write_synthetic_dataset
from bevctl.errors import BevctlError

MAP = "singapore-onenorth"


@pytest.fixture(scope="module")
def nusc(tiny_synth):
    from nuscenes.nuscenes import NuScenes

    root, version = tiny_synth
    return NuScenes(version=version, dataroot=str(root), verbose=False)


@pytest.fixture(scope="module")
def nmap(tiny_synth):
    from nuscenes.map_expansion.map_api import NuScenesMap

    root, _ = tiny_synth
    return NuScenesMap(dataroot=str(root), map_name=MAP)


# ---- format ----------------------------------------------------------------------------------


def test_devkit_loads_tables_and_images(nusc, tiny_synth):
    root, version = tiny_synth
    assert len(nusc.scene) == 2 and len(nusc.sample) == 8
    cams = ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT"]
    for sample in nusc.sample:
        assert set(sample["data"]) == set(cams) | {"LIDAR_TOP"}
        stamps = set()
        for ch in cams:
            path, boxes, K = nusc.get_sample_data(sample["data"][ch])
            img = Image.open(path)
            assert img.size == (160, 90) and img.mode == "RGB"
            assert K.shape == (3, 3) and 50 < K[0, 0] < 200
            sd = nusc.get("sample_data", sample["data"][ch])
            stamps.add(sd["timestamp"])
            gt = Image.open(Path(root) / "semantic" / (sd["filename"][:-4] + ".png"))
            assert gt.size == (160, 90) and gt.mode == "L"
        assert len(stamps) == 6  # every camera fires at its own time
        assert len(sample["anns"]) > 0
    # lidar file loads; classes file as documented
    from nuscenes.utils.data_classes import LidarPointCloud

    pc = LidarPointCloud.from_file(nusc.get_sample_data_path(nusc.sample[0]["data"]["LIDAR_TOP"]))
    assert pc.points.shape[0] == 4 and pc.points.shape[1] > 0
    classes = json.loads((Path(root) / "semantic" / "classes.json").read_text())["classes"]
    assert tuple(classes) == SYNTH_CLASSES
    assert SYNTH_CLASSES[2] == "lane_marking" and SYNTH_CLASSES[9] == "vehicle"
    split = json.loads((Path(root) / version / "bevctl_splits.json").read_text())
    assert sorted(split["train"] + split["val"]) == sorted(s["name"] for s in nusc.scene)
    assert len(split["val"]) >= 1 and len(split["train"]) >= 1


def test_map_expansion_queries(nusc, nmap):
    sample = nusc.sample[2]
    sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    x, y = nusc.get("ego_pose", sd["ego_pose_token"])["translation"][:2]
    recs = nmap.get_records_in_patch((x - 40, y - 40, x + 40, y + 40), nmap.non_geometric_layers, mode="intersect")
    for layer in ("drivable_area", "road_segment", "lane", "road_divider", "walkway"):
        assert recs[layer], layer
    # the ego stands on a lane (or an intersection connector) of the map
    assert nmap.layers_on_point(x, y)["drivable_area"] != ""
    lane = nmap.get_closest_lane(x, y, radius=3.0)
    assert lane
    from nuscenes.map_expansion.arcline_path_utils import discretize_lane

    poses = np.array(discretize_lane(nmap.get_arcline_path(lane), 0.5))
    assert np.min(np.hypot(poses[:, 0] - x, poses[:, 1] - y)) < 0.5
    mask = nmap.get_map_mask((x, y, 60, 30), 0.0, ["drivable_area", "walkway"], (200, 400))
    assert mask.shape == (2, 200, 400) and mask[0].mean() > 0.1 and mask[1].mean() > 0.0
    # stop lines carry their cue (crossing or traffic light), as the devkit resolves it
    types = {r["stop_line_type"] for r in nmap.stop_line}
    assert types <= {"PED_CROSSING", "TRAFFIC_LIGHT"} and all(r["cue"] for r in nmap.stop_line)
    # the map table's PNG exists and loads through the devkit
    log = nusc.get("log", nusc.scene[0]["log_token"])
    prior = nusc.get("map", log["map_token"])["mask"]
    assert prior.is_on_mask(x, y)[0]


def test_ego_drives_realistically(nusc):
    for scene in nusc.scene:
        tok, xy, ts = scene["first_sample_token"], [], []
        while tok:
            s = nusc.get("sample", tok)
            ep = nusc.get("ego_pose", nusc.get("sample_data", s["data"]["LIDAR_TOP"])["ego_pose_token"])
            xy.append(ep["translation"][:2])
            ts.append(s["timestamp"])
            assert ep["translation"][2] == 0.0
            tok = s["next"]
        v = np.linalg.norm(np.diff(np.array(xy), axis=0), axis=1) / (np.diff(ts) * 1e-6)
        assert np.all((v > 3.0) & (v < 14.0)), v
        assert np.all(np.abs(np.diff(ts) - 500_000) < 5000)


# ---- world vs images --------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _world_layers(path: str) -> list[tuple[int, object]]:
    """(class id, prepared union of that class's polygons) in paint order."""
    world = json.loads(Path(path).read_text())
    out = []
    for name in world["paint_order"]:
        geom = shapely.union_all([shapely.Polygon(r[0], r[1:]) for r in world["polygons"][name]])
        shapely.prepare(geom)
        out.append((SYNTH_CLASSES.index(name), geom))
    return out


def _world_classes(root: Path, version: str, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    out = np.full(gx.shape, SYNTH_CLASSES.index("other_ground"), np.uint8)
    for cid, geom in _world_layers(str(root / version / "bevctl_world.json")):
        out[shapely.contains_xy(geom, gx, gy)] = cid
    return out


def _ground_points_in_image(nusc, sd_token: str, spacing: float = 0.1, radius: float = 25.0):
    """Dense global ground points near the camera, projected with the devkit's math."""
    from nuscenes.utils.geometry_utils import transform_matrix, view_points
    from pyquaternion import Quaternion

    sd = nusc.get("sample_data", sd_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    ep = nusc.get("ego_pose", sd["ego_pose_token"])
    g_T_e = transform_matrix(ep["translation"], Quaternion(ep["rotation"]))
    e_T_c = transform_matrix(cs["translation"], Quaternion(cs["rotation"]))
    c_T_g = np.linalg.inv(g_T_e @ e_T_c)
    ex, ey = ep["translation"][:2]
    g = np.arange(-radius, radius, spacing)
    gx, gy = np.meshgrid(ex + g, ey + g)
    gx, gy = gx.ravel(), gy.ravel()
    pts = np.stack([gx, gy, np.zeros_like(gx), np.ones_like(gx)])
    cam = (c_T_g @ pts)[:3]
    front = cam[2] > 1.0
    uv = view_points(cam[:, front], np.array(cs["camera_intrinsic"]), normalize=True)[:2]
    u, v = np.rint(uv[0]).astype(int), np.rint(uv[1]).astype(int)
    inside = (u >= 0) & (u < sd["width"]) & (v >= 0) & (v < sd["height"])
    return gx[front][inside], gy[front][inside], u[inside], v[inside], sd


def _stable(gt: np.ndarray, r: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood has one class and no vehicle."""
    import cv2

    ok = np.ones(gt.shape, bool)
    k = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    for c in np.unique(gt):
        m = (gt == c).astype(np.uint8)
        inner = cv2.erode(m, k, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
        ok &= ~(m.astype(bool) & ~inner)
    veh = cv2.dilate((gt == SYNTH_CLASSES.index("vehicle")).astype(np.uint8), k).astype(bool)
    return ok & ~veh


def _agreement(nusc, root: Path, classify, step: int = 2) -> tuple[int, int, dict]:
    agree = total = 0
    confusion: dict = {}
    for sample in nusc.sample[::step]:
        for ch, sd_tok in sample["data"].items():
            if ch == "LIDAR_TOP":
                continue
            gx, gy, u, v, sd = _ground_points_in_image(nusc, sd_tok)
            gt = np.array(Image.open(root / "semantic" / (sd["filename"][:-4] + ".png")))
            keep = _stable(gt)[v, u]
            exp = classify(gx[keep], gy[keep])
            got = gt[v[keep], u[keep]]
            known = exp != 255
            agree += int(np.sum(exp[known] == got[known]))
            total += int(np.sum(known))
            for e, g_ in zip(exp[known][exp[known] != got[known]][:50], got[known][exp[known] != got[known]][:50]):
                confusion[(SYNTH_CLASSES[e], SYNTH_CLASSES[g_])] = confusion.get((SYNTH_CLASSES[e], SYNTH_CLASSES[g_]), 0) + 1
    return agree, total, confusion


def test_world_geometry_matches_rendered_gt(nusc, tiny_synth):
    root, version = tiny_synth
    agree, total, conf = _agreement(nusc, Path(root), lambda x, y: _world_classes(Path(root), version, x, y))
    assert total > 20_000
    assert agree / total >= 0.99, (agree / total, conf)


def test_map_expansion_polygons_match_rendered_gt(nusc, nmap, tiny_synth):
    """Map layers -> expected image class: ped_crossing, stop_line, walkway, drivable_area (away
    from painted lines) -- projected with the devkit's own math onto the rendered GT."""
    root, _ = tiny_synth
    C = {n: i for i, n in enumerate(SYNTH_CLASSES)}

    def polys(layer):
        out = []
        for rec in getattr(nmap, layer):
            toks = rec["polygon_tokens"] if layer == "drivable_area" else [rec["polygon_token"]]
            out += [nmap.extract_polygon(t) for t in toks]
        return shapely.union_all(out)

    drivable, walk, cross, stop = (polys(n) for n in ("drivable_area", "walkway", "ped_crossing", "stop_line"))
    lines = shapely.union_all(
        [nmap.extract_line(r["line_token"]) for r in nmap.road_divider + nmap.lane_divider]
    ).buffer(0.35)
    near_drive = drivable.boundary.buffer(0.5)  # curb band straddles the road edge
    shapely.prepare(drivable), shapely.prepare(walk), shapely.prepare(cross), shapely.prepare(stop)
    shapely.prepare(lines), shapely.prepare(near_drive)

    def classify(x, y):
        exp = np.full(x.shape, 255, np.uint8)  # 255: no claim
        on_road = shapely.contains_xy(drivable, x, y) & ~shapely.contains_xy(lines, x, y)
        on_road &= ~shapely.contains_xy(near_drive, x, y)
        exp[on_road] = C["road"]
        exp[shapely.contains_xy(walk, x, y)] = C["sidewalk"]
        exp[shapely.contains_xy(cross, x, y)] = C["crosswalk"]
        exp[shapely.contains_xy(stop, x, y)] = C["stop_line"]
        return exp

    agree, total, conf = _agreement(nusc, Path(root), classify)
    assert total > 10_000
    assert agree / total >= 0.99, (agree / total, conf)


def test_boxes_project_onto_vehicle_pixels(nusc, tiny_synth):
    """Annotated box centres (devkit get_sample_data, camera frame) land on vehicle GT pixels."""
    from nuscenes.utils.geometry_utils import view_points

    root, _ = tiny_synth
    hits = checked = 0
    for sample in nusc.sample:
        for ch, sd_tok in sample["data"].items():
            if ch == "LIDAR_TOP":
                continue
            path, boxes, K = nusc.get_sample_data(sd_tok)
            sd = nusc.get("sample_data", sd_tok)
            gt = np.array(Image.open(Path(root) / "semantic" / (sd["filename"][:-4] + ".png")))
            for b in boxes:
                c = b.center
                if c[2] < 2.0 or c[2] > 40:
                    continue
                u, v = np.rint(view_points(c[:, None], K, normalize=True)[:2, 0]).astype(int)
                if 0 <= u < gt.shape[1] and 0 <= v < gt.shape[0]:
                    checked += 1
                    win = gt[max(v - 2, 0) : v + 3, max(u - 2, 0) : u + 3]
                    hits += bool((win == SYNTH_CLASSES.index("vehicle")).any())
    assert checked >= 3
    assert hits / checked >= 0.9  # a nearer box may occlude a centre


# ---- determinism, errors -----------------------------------------------------------------------


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_different_seed_different_world(tmp_path, tiny_synth):
    cfg = SynthConfig(scenes=2, samples_per_scene=2, image_hw=(48, 80), seed=0, workers=1)
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_dataset(cfg, a, progress=False)
    write_synthetic_dataset(SynthConfig(**{**cfg.__dict__, "workers": 2}), b, progress=False)
    assert _digest(a) == _digest(b)
    c = tmp_path / "c"
    write_synthetic_dataset(SynthConfig(**{**cfg.__dict__, "seed": 1}), c, progress=False)
    wa = json.loads((a / cfg.version / "bevctl_world.json").read_text())
    wc = json.loads((c / cfg.version / "bevctl_world.json").read_text())
    assert wa["polygons"] != wc["polygons"]
    assert _digest(a) != _digest(c)


def test_bad_inputs(tmp_path):
    for bad in ("", "225", "225x", "x400", "0x400", "225*400", "abcxdef"):
        with pytest.raises(BevctlError, match="--image-size"):
            parse_hw(bad, "--image-size")
    assert parse_hw(" 90X160 ", "--image-size") == (90, 160)
    with pytest.raises(BevctlError, match="--scenes"):
        SynthConfig(scenes=0)
    with pytest.raises(BevctlError, match="--image-size"):
        SynthConfig(image_hw=(4, 4))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cfg = SynthConfig(scenes=1, samples_per_scene=1, image_hw=(32, 48), workers=1)
    with pytest.raises(BevctlError, match="not empty"):
        write_synthetic_dataset(cfg, out, progress=False)
    assert (out / "keep.txt").read_text() == "x"
    write_synthetic_dataset(cfg, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / cfg.version / "sample.json").exists()
    assert not list(tmp_path.glob(".out.synth-*"))  # no temp dirs left behind


def test_cli_errors(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "o"
    r = subprocess.run(
        [sys.executable, "-m", "bevctl.cli", "synth", str(out), "--image-size", "12by3"],
        capture_output=True, text=True,
    )
    assert r.returncode == 2 and "error: --image-size '12by3'" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_lane_arclines_follow_lane_polygons(nmap):
    """Every lane / lane connector arcline (devkit discretisation) stays inside its polygon and
    ends at its end pose; connectivity links lanes through connectors."""
    from nuscenes.map_expansion.arcline_path_utils import discretize_lane

    recs = nmap.lane + nmap.lane_connector
    assert len(nmap.lane) > 50 and len(nmap.lane_connector) > 100
    for rec in recs[::7]:
        path = nmap.arcline_path_3[rec["token"]]
        poses = np.array(discretize_lane(path, 0.25))
        assert np.linalg.norm(poses[-1, :2] - np.array(path[-1]["end_pose"][:2])) < 1e-3
        poly = nmap.extract_polygon(rec["polygon_token"]).buffer(0.01)
        assert shapely.contains_xy(poly, poses[:, 0], poses[:, 1]).all(), rec["token"]
    lane = next(r["token"] for r in nmap.lane if nmap.get_outgoing_lane_ids(r["token"]))
    conn = nmap.get_outgoing_lane_ids(lane)[0]
    assert nmap.get_incoming_lane_ids(conn) == [lane]
    assert nmap.get_outgoing_lane_ids(conn)[0] in {r["token"] for r in nmap.lane}


@pytest.mark.slow
def test_small_synth_agreement_all_samples(small_synth):
    """Heavier: world geometry vs rendered GT on every sample and camera of ``small_synth``."""
    from nuscenes.nuscenes import NuScenes

    root, version = small_synth
    nusc = NuScenes(version=version, dataroot=str(root), verbose=False)
    agree, total, conf = _agreement(nusc, Path(root), lambda x, y: _world_classes(Path(root), version, x, y), step=1)
    assert total > 100_000
    assert agree / total >= 0.995, (agree / total, conf)


def test_rig_is_perturbed_per_scene_and_near_nuscenes(nusc):
    """Each scene has its own calibration, within ~2 deg / 10 cm of the real nuScenes rig."""
    from pyquaternion import Quaternion

    from bevctl.data.synth_scene import load_rig

    rig = load_rig()["cameras"]
    per_scene: dict[str, dict] = {}
    for scene in nusc.scene:
        s = nusc.get("sample", scene["first_sample_token"])
        for ch, tok in s["data"].items():
            if ch == "LIDAR_TOP":
                continue
            cs = nusc.get("calibrated_sensor", nusc.get("sample_data", tok)["calibrated_sensor_token"])
            per_scene.setdefault(ch, {})[scene["name"]] = cs
            q_ref = Quaternion(rig[ch]["rotation"])
            ang = np.degrees(abs((Quaternion(cs["rotation"]) * q_ref.inverse).angle))
            assert ang < 2.5, (ch, ang)
            assert np.linalg.norm(np.array(cs["translation"]) - rig[ch]["translation"]) < 0.1
    for ch, by_scene in per_scene.items():
        rots = [tuple(c["rotation"]) for c in by_scene.values()]
        assert len(set(rots)) == len(rots), ch  # perturbed per scene


def test_each_camera_has_its_own_ego_pose(nusc):
    """Cameras fire tens of ms apart; their ego poses follow the motion between keyframes."""
    s = nusc.sample[1]
    lidar = nusc.get("sample_data", s["data"]["LIDAR_TOP"])
    p0 = np.array(nusc.get("ego_pose", lidar["ego_pose_token"])["translation"])
    spread = []
    for ch, tok in s["data"].items():
        sd = nusc.get("sample_data", tok)
        dt = (sd["timestamp"] - lidar["timestamp"]) * 1e-6
        assert abs(dt) < 0.06
        p = np.array(nusc.get("ego_pose", sd["ego_pose_token"])["translation"])
        assert np.linalg.norm(p - p0) <= 13.0 * abs(dt) + 1e-6  # never faster than 13 m/s
        spread.append(dt)
    assert max(spread) - min(spread) > 0.03


@pytest.mark.parametrize("seed", [0, 3])
def test_classifier_matches_world_polygons(seed):
    """The renderer's analytic ground classifier and the exported polygons are the same world:
    random points everywhere plus a dense 5 cm grid around every T-junction."""
    from bevctl.data.synth_map import PAINT_ORDER, world_polygons
    from bevctl.data.synth_world import make_world

    world = make_world(seed)
    polys = world_polygons(world)
    rng = np.random.default_rng(seed)
    gx = rng.uniform(0, world.canvas[0], 150_000)
    gy = rng.uniform(0, world.canvas[1], 150_000)
    centres = [
        (world.cols.c[k], world.rows.c[c]) if kind == "col" else (world.cols.c[c], world.rows.c[k])
        for kind, st in (("col", world.cols), ("row", world.rows))
        for k, m in zip(*np.nonzero(~st.seg_exists))
        for c in (m - 1, m)
    ]
    assert centres, "expected at least one T-junction"
    g = np.arange(-14.0, 14.0, 0.05)
    for cx, cy in centres[:2]:
        lx, ly = np.meshgrid(cx + g, cy + g)
        tx, ty = world.to_global(lx.ravel(), ly.ravel())
        gx, gy = np.concatenate([gx, tx]), np.concatenate([gy, ty])
    cls, _ = world.classify(gx, gy)
    exp = np.full(gx.shape, SYNTH_CLASSES.index("other_ground"), np.uint8)
    for name in PAINT_ORDER:
        geom = shapely.union_all(polys[name])
        exp[shapely.contains_xy(geom, gx, gy)] = SYNTH_CLASSES.index(name)
    assert np.array_equal(cls, exp)
    assert set(np.unique(cls).tolist()) == set(range(1, 9))  # every ground class occurs, no sky/vehicle


def test_curb_band_is_centred_on_the_road_edge():
    """The curb straddles the road edge (outline of the road polygons = the map's road_segment and
    lane layers): 0.15 m on the road, 0.15 m outside, like the nuScenes / HDMapNet boundary band."""
    from bevctl.data.synth_map import world_polygons
    from bevctl.data.synth_world import make_world

    world = make_world(0)
    polys = world_polygons(world)
    road = shapely.union_all(polys["road"])
    curb = shapely.union_all(polys["curb"])
    painted = shapely.union_all(polys["crosswalk"] + polys["stop_line"])
    inner, outer = curb.intersection(road).area, curb.difference(road).area
    assert inner > 100.0 and abs(inner - outer) / outer < 0.02, (inner, outer)
    assert curb.difference(road.boundary.buffer(0.15 + 1e-6, join_style="mitre")).area < 1e-6
    # points just either side of the edge, away from corners and the world's border
    edge = road.boundary
    s = np.arange(0.0, edge.length, 0.7)
    p = shapely.get_coordinates(edge.interpolate(s))
    t = shapely.get_coordinates(edge.interpolate(s + 0.05)) - shapely.get_coordinates(edge.interpolate(s - 0.05))
    straight = np.isclose(np.hypot(t[:, 0], t[:, 1]), 0.1)
    lx, ly = world.to_local(p[:, 0], p[:, 1])
    away = (lx > 1) & (lx < world.size[0] - 1) & (ly > 1) & (ly < world.size[1] - 1)
    corners = shapely.multipoints(shapely.get_coordinates(edge)).buffer(0.5)
    keep = straight & away & ~shapely.contains_xy(corners, p[:, 0], p[:, 1])
    p, t = p[keep], t[keep] / 0.1
    n = np.stack([-t[:, 1], t[:, 0]], 1)
    n *= np.where(shapely.contains_xy(road, *(p + 0.05 * n).T), -1.0, 1.0)[:, None]  # outward
    C = {k: SYNTH_CLASSES.index(k) for k in ("road", "curb", "sidewalk")}
    clear = ~shapely.contains_xy(painted.buffer(0.3), *p.T)
    assert clear.sum() > 500
    got = {d: world.classify(*(p + d * n).T)[0][clear] for d in (-0.3, -0.1, 0.1, 0.3)}
    assert np.all(got[-0.1] == C["curb"]) and np.all(got[0.1] == C["curb"])
    assert np.all(np.isin(got[-0.3], [C["road"], SYNTH_CLASSES.index("lane_marking")]))
    assert np.all(got[0.3] == C["sidewalk"])
