"""BEV ground-truth rasteriser: exact centre-in-shape rule, class rules, map access, synth world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from bevctl.config import CLASS_SETS, GRID_PRESETS, BEVClassSet, BEVGrid
from bevctl.data import nuscenes_map
from bevctl.data.bev_gt import (
    bev_gt_for_sample,
    cell_T_global,
    fill_polygons,
    map_elements_for_sample,
    rasterize_sample,
    required_layers,
)
from bevctl.data.records import SampleRecord
from bevctl.errors import BevctlError

DEMO = GRID_PRESETS["demo"]  # x in [-16, 16], y in [-8, 8], 0.25 m -> 128 x 64
HDMAP = CLASS_SETS["hdmapnet"]  # boundary=1, ped_crossing=2, divider=3


def pose(yaw: float, tx: float, ty: float, tz: float = 0.0) -> np.ndarray:
    """global_T_ego (4, 4) for a yaw rotation and translation."""
    g = np.eye(4)
    c, s = np.cos(yaw), np.sin(yaw)
    g[:2, :2] = [[c, -s], [s, c]]
    g[:3, 3] = [tx, ty, tz]
    return g


def to_global(g: np.ndarray, geom: shapely.Geometry) -> shapely.Geometry:
    """An ego-frame geometry placed in the global frame by ``global_T_ego``."""
    return shapely.transform(geom, lambda xy: xy @ g[:2, :2].T + g[:2, 3])


def centres(grid: BEVGrid) -> tuple[np.ndarray, np.ndarray]:
    """Ego x, y of every cell centre, each (X, Y)."""
    i, j = np.meshgrid(np.arange(grid.nx), np.arange(grid.ny), indexing="ij")
    return grid.x_min + (i + 0.5) * grid.resolution, grid.y_min + (j + 0.5) * grid.resolution


def reference_mask(geoms: list[shapely.Geometry], g: np.ndarray, grid: BEVGrid) -> np.ndarray:
    """Dense point-in-polygon reference: cell centres mapped to global, tested with shapely."""
    x, y = centres(grid)
    gx = g[0, 0] * x + g[0, 1] * y + g[0, 3]
    gy = g[1, 0] * x + g[1, 1] * y + g[1, 3]
    out = np.zeros(grid.shape, dtype=bool)
    for geom in geoms:
        out |= shapely.contains_xy(geom, gx, gy)
    return out


# ---- a minimal map-expansion JSON that NuScenesMap loads ------------------------------------

ALL_LAYERS = (
    "drivable_area", "road_segment", "road_block", "lane", "ped_crossing", "walkway", "stop_line",
    "carpark_area", "road_divider", "lane_divider", "traffic_light", "lane_connector",
)


def write_map_json(
    dataroot: Path,
    location: str,
    lines: dict[str, list[list[tuple[float, float]]]],
    polygons: dict[str, list[list[tuple[float, float]]]],
) -> Path:
    """Write ``maps/expansion/<location>.json`` (v1.3 layout) with the given line/polygon records."""
    data: dict = {"version": "1.3", "canvas_edge": [3000.0, 3000.0], "node": [], "line": [], "polygon": [],
                  "arcline_path_3": {}, "connectivity": {}}
    for layer in ALL_LAYERS:
        data[layer] = []
    counter = iter(range(10**9))

    def nodes(coords: list[tuple[float, float]]) -> list[str]:
        tokens = []
        for x, y in coords:
            t = f"n{next(counter)}"
            data["node"].append({"token": t, "x": float(x), "y": float(y)})
            tokens.append(t)
        return tokens

    for layer, items in lines.items():
        for coords in items:
            lt = f"l{next(counter)}"
            data["line"].append({"token": lt, "node_tokens": nodes(coords)})
            data[layer].append({"token": f"r{next(counter)}", "line_token": lt})
    for layer, items in polygons.items():
        for coords in items:
            pt = f"p{next(counter)}"
            data["polygon"].append({"token": pt, "exterior_node_tokens": nodes(coords), "holes": []})
            rec: dict = {"token": f"r{next(counter)}", "polygon_token": pt}
            if layer == "lane":
                rec.update(left_lane_divider_segments=[], right_lane_divider_segments=[])
            if layer == "stop_line":
                rec.update(stop_line_type="STOP_SIGN", ped_crossing_tokens=[], traffic_light_tokens=[])
            if layer == "drivable_area":
                rec = {"token": rec["token"], "polygon_tokens": [pt]}
            data[layer].append(rec)
    path = dataroot / "maps" / "expansion" / f"{location}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def box_coords(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def make_sample(token: str, g: np.ndarray, location: str = "singapore-onenorth", scene: str = "scene-0001",
                index_in_scene: int = 0, prev: str | None = None) -> SampleRecord:
    return SampleRecord(token=token, scene_token=f"st-{scene}", scene_name=scene, index_in_scene=index_in_scene,
                        timestamp=index_in_scene * 500_000, location=location, global_T_ego=g, cameras=(),
                        prev_token=prev)


# ---- the fill --------------------------------------------------------------------------------


def test_fill_matches_dense_point_in_polygon_reference() -> None:
    rng = np.random.default_rng(0)
    grid = GRID_PRESETS["hdmapnet"]
    inside = 0
    for _ in range(20):
        g = pose(rng.uniform(-np.pi, np.pi), *rng.uniform(-500, 500, 2))
        polys = []
        for k in range(5):
            c = rng.uniform([-35, -20], [35, 20])
            p = shapely.Polygon(c + rng.normal(0, 4, (8, 2))).convex_hull
            if k == 4:  # a polygon with a hole
                p = p.buffer(3).difference(shapely.Point(c).buffer(1.5))
            polys.append(to_global(g, p))
        mask = fill_polygons(polys, grid.shape, cell_T_global(g, grid))
        ref = reference_mask(polys, g, grid)
        inside += int(ref.sum())
        assert np.array_equal(mask, ref)
    assert inside > 10_000  # the shapes really covered cells


def test_fill_centre_rule_at_cell_boundaries() -> None:
    # A box whose edges sit exactly on cell edges (x = 0, 1 m; y = 0, 0.5 m) covers exactly
    # the 4 x 2 cells inside; shifted by just under half a cell it still does, by just over not.
    g = np.eye(4)
    t = cell_T_global(g, DEMO)
    x, y = centres(DEMO)
    for shift, expect_same in ((0.0, True), (0.124, True), (0.126, False)):
        box = shapely.box(0 + shift, 0, 1 + shift, 0.5)
        mask = fill_polygons([box], DEMO.shape, t)
        expected = (x >= 0) & (x < 1) & (y >= 0) & (y < 0.5)
        assert mask.sum() == 8
        assert np.array_equal(mask, expected) == expect_same


def test_overlapping_polygons_form_their_union() -> None:
    g = np.eye(4)
    a, b = shapely.box(-2, -2, 2, 2), shapely.box(0, 0, 4, 4)
    mask = fill_polygons([a, b, b], DEMO.shape, cell_T_global(g, DEMO))  # b twice: still inside
    assert np.array_equal(mask, reference_mask([a.union(b)], g, DEMO))


# ---- class rules -----------------------------------------------------------------------------


def test_dashed_divider_and_crosswalk_land_in_expected_cells() -> None:
    """A dashed divider along ego x at y = 1 and a crosswalk, seen from a rotated, moved ego:
    the expected cells are computed analytically from the cell centres (no shapely)."""
    g = pose(np.deg2rad(37.0), 1234.5, -987.25, 0.3)
    dashes = [shapely.LineString([(x0, 1.0), (x0 + 3.0, 1.0)]) for x0 in np.arange(-20.0, 20.0, 6.0)]
    crosswalk = shapely.box(5.0, -6.0, 9.0, 6.0)
    elements = {
        "lane_divider": [to_global(g, d) for d in dashes],
        "road_divider": [],
        "ped_crossing": [to_global(g, crosswalk)],
        "road_segment": [], "lane": [],
    }
    out = rasterize_sample(elements, g, DEMO, HDMAP)
    x, y = centres(DEMO)
    w = HDMAP.line_width_m
    on_dash = np.zeros(DEMO.shape, bool)
    for x0 in np.arange(-20.0, 20.0, 6.0):
        on_dash |= (x > x0) & (x < x0 + 3.0) & (np.abs(y - 1.0) < w / 2)
    in_cross = (x > 5.0) & (x < 9.0) & (np.abs(y) < 6.0)
    expected = np.zeros(DEMO.shape, np.uint8)
    expected[in_cross] = 2
    expected[on_dash] = 3  # divider is listed after ped_crossing: it wins the overlap
    assert on_dash.sum() > 0 and (on_dash & in_cross).sum() > 0
    assert np.array_equal(out, expected)


def test_outline_draws_union_boundary_and_holes_only() -> None:
    g = pose(0.5, 10.0, 20.0)
    road = shapely.Polygon(box_coords(-100, -5, 100, 5), [box_coords(2, -1, 6, 1)])  # island hole
    lane = shapely.box(-100, 1.5, 100, 5)  # inside the road: its edge y = 1.5 is no boundary
    elements = {"road_segment": [to_global(g, road)], "lane": [to_global(g, lane)],
                "ped_crossing": [], "lane_divider": [], "road_divider": []}
    out = rasterize_sample(elements, g, DEMO, HDMAP)
    x, y = centres(DEMO)
    h = HDMAP.line_width_m / 2
    outer = np.abs(np.abs(y) - 5.0) < h
    island = shapely.Polygon(box_coords(2, -1, 6, 1)).boundary.buffer(h, cap_style="flat", join_style="round")
    hole = reference_mask([island], np.eye(4), DEMO)
    assert hole.sum() > 0
    assert np.array_equal(out == 1, outer | hole)  # also: no artificial edges where the map is clipped
    # no boundary along y = 1.5 (the lane edge inside the road) nor at the grid edges (clipping)
    assert not (out[:, np.abs(y[0] - 1.5) < 0.2] == 1).any()


def test_outline_closes_hairline_gaps_but_keeps_real_ones() -> None:
    # Two road pieces meeting at x = 3 with a 1e-6 m gap (rounded map nodes): outlined as one
    # road, no boundary across it; the same pieces 0.5 m apart: outlined as two roads.
    x, y = centres(DEMO)
    pts = shapely.points(x, y)
    for gap in (1e-6, 0.5):
        left, right = shapely.box(-100, -5, 3, 5), shapely.box(3 + gap, -5, 100, 5)
        elements = {"road_segment": [left, right], "lane": [], "ped_crossing": [], "lane_divider": [],
                    "road_divider": []}
        out = rasterize_sample(elements, np.eye(4), DEMO, HDMAP)
        outline = shapely.box(-100, -5, 100, 5) if gap < 0.01 else shapely.union(left, right)
        expected = shapely.distance(outline.boundary, pts) < HDMAP.line_width_m / 2
        assert np.array_equal(out == 1, expected)
        assert ((out == 1) & (np.abs(y) < 4.5)).any() == (gap > 0.01)


def test_markings_class_set_priority_and_stop_line() -> None:
    cs = CLASS_SETS["markings"]  # boundary, ped_crossing, stop_line, road_divider, lane_divider
    g = np.eye(4)
    elements = {
        "ped_crossing": [shapely.box(0, -4, 4, 4)],
        "stop_line": [shapely.box(3.5, -4, 4.5, 4)],
        "road_divider": [shapely.LineString([(-10, 0), (10, 0)])],
        "lane_divider": [shapely.LineString([(-10, 2), (10, 2)])],
        "road_segment": [], "lane": [],
    }
    out = rasterize_sample(elements, g, DEMO, cs)
    x, y = centres(DEMO)
    names = cs.names_with_background
    at = lambda px, py: names[out[int((px + 16) / 0.25), int((py + 8) / 0.25)]]  # noqa: E731
    assert at(1.0, -3.0) == "ped_crossing"
    assert at(4.1, -3.0) == "stop_line"  # stop_line listed after ped_crossing
    assert at(1.0, 0.05) == "road_divider"  # divider over the crosswalk
    assert at(1.0, 2.05) == "lane_divider"
    assert at(-5.0, -3.0) == "background"
    assert set(np.unique(out)) == {0, 2, 3, 4, 5}


def test_required_layers_and_bad_rule() -> None:
    assert set(required_layers(HDMAP)) == {"road_segment", "lane", "ped_crossing", "road_divider", "lane_divider"}
    bad = BEVClassSet(name="bad", classes=("x",), layers={"x": {"dots": ("lane",)}})
    with pytest.raises(BevctlError, match="unknown rule 'dots'"):
        required_layers(bad)


# ---- the map module on a real map-expansion JSON ---------------------------------------------


def test_map_elements_and_bev_gt_for_sample(tmp_path: Path) -> None:
    nuscenes_map.clear_caches()
    write_map_json(
        tmp_path, "singapore-onenorth",
        lines={"lane_divider": [[(x, 101.0), (x + 3, 101.0)] for x in range(80, 120, 6)],
               "road_divider": [[(500.0, 0.0), (600.0, 0.0)]]},  # far away
        polygons={"ped_crossing": [box_coords(105, 95, 109, 107)],
                  "road_segment": [box_coords(0, 94, 200, 106)], "lane": [box_coords(0, 100, 200, 106)]},
    )
    g = pose(0.0, 100.0, 100.0)
    sample = make_sample("tok", g)
    elements = map_elements_for_sample(tmp_path, sample, DEMO, HDMAP)
    assert len(elements["road_divider"]) == 0  # outside the query box
    assert len(elements["lane_divider"]) == 7 and len(elements["ped_crossing"]) == 1
    out = bev_gt_for_sample(tmp_path, sample, DEMO, HDMAP)
    expected = rasterize_sample(
        {"lane_divider": [shapely.LineString([(x, 101.0), (x + 3, 101.0)]) for x in range(80, 120, 6)],
         "road_divider": [], "ped_crossing": [shapely.box(105, 95, 109, 107)],
         "road_segment": [shapely.box(0, 94, 200, 106)], "lane": [shapely.box(0, 100, 200, 106)]},
        g, DEMO, HDMAP)
    assert np.array_equal(out, expected)
    assert set(np.unique(out)) == {0, 1, 2, 3}


def test_missing_or_unknown_map_is_one_clear_error(tmp_path: Path) -> None:
    nuscenes_map.clear_caches()
    with pytest.raises(BevctlError, match=r"map expansion not found: .*boston-seaport\.json"):
        bev_gt_for_sample(tmp_path, make_sample("t", np.eye(4), "boston-seaport"), DEMO, HDMAP)
    with pytest.raises(BevctlError, match="unknown map location 'mars'"):
        bev_gt_for_sample(tmp_path, make_sample("t", np.eye(4), "mars"), DEMO, HDMAP)
    with pytest.raises(BevctlError, match="global_T_ego must be a finite 4x4"):
        rasterize_sample({}, np.full((4, 4), np.nan), DEMO, HDMAP)


# ---- the synthetic world: BEV GT from its map expansion vs the world's own geometry ----------


def _world_geometry(dataroot: Path, version: str) -> tuple[dict[str, shapely.Geometry], shapely.Geometry]:
    """Union per ground class of ``bevctl_world.json`` (global frame) and the world rectangle."""
    data = json.loads((dataroot / version / "bevctl_world.json").read_text())
    geoms = {
        name: shapely.union_all([shapely.Polygon(rings[0], rings[1:]) for rings in polys])
        for name, polys in data["polygons"].items()
    }
    w = data["world"]
    c, s = np.cos(w["theta"]), np.sin(w["theta"])
    rect = shapely.affinity.affine_transform(shapely.box(0, 0, *w["size"]), [c, -s, s, c, *w["origin"]])
    return geoms, rect


def test_synth_world_bev_gt_agrees_with_world_geometry(tiny_synth: tuple[Path, str]) -> None:
    """Every keyframe of the synthetic world, markings classes on the hdmapnet grid:
    crosswalks and stop lines land exactly on the world's own polygons, the boundary band is
    exactly the cells within line_width/2 of the road's edge, and every painted lane-marking
    cell is a lane divider."""
    import shapely.affinity  # noqa: F401

    from bevctl.data.nuscenes import load_index

    dataroot, version = tiny_synth
    world, world_rect = _world_geometry(dataroot, version)
    road_edge = world["road"].boundary
    grid, cs = GRID_PRESETS["hdmapnet"], CLASS_SETS["markings"]
    ids = {name: k + 1 for k, name in enumerate(cs.classes)}
    x, y = centres(grid)
    totals = dict.fromkeys(("crosswalk", "stop_line", "boundary", "lane_marking", "yellow", "yellow_hit"), 0)
    samples = load_index(dataroot, version).all_samples()
    assert len(samples) == 8
    for sample in samples:
        out = bev_gt_for_sample(dataroot, sample, grid, cs)
        g = sample.global_T_ego
        gx = g[0, 0] * x + g[0, 1] * y + g[0, 3]
        gy = g[1, 0] * x + g[1, 1] * y + g[1, 3]
        ref = {name: shapely.contains_xy(world[name], gx, gy) for name in
               ("crosswalk", "stop_line", "lane_marking", "road_divider_marking")}
        above = lambda name: out > ids[name]  # noqa: E731 - painted over by a later class
        assert np.array_equal((out == ids["ped_crossing"])[~above("ped_crossing")], ref["crosswalk"][~above("ped_crossing")])
        assert np.array_equal((out == ids["stop_line"])[~above("stop_line")], ref["stop_line"][~above("stop_line")])
        dist = shapely.distance(road_edge, shapely.points(gx, gy))
        # the synthetic map's lanes run past the world edge: compare inside the world only
        inside = shapely.contains_xy(world_rect.buffer(-1.0), gx, gy) & ~above("boundary")
        assert np.array_equal((out == ids["boundary"])[inside], (dist < cs.line_width_m / 2)[inside])
        assert (out[ref["lane_marking"]] == ids["lane_divider"]).all()
        totals["crosswalk"] += int(ref["crosswalk"].sum())
        totals["stop_line"] += int(ref["stop_line"].sum())
        totals["boundary"] += int((out == ids["boundary"]).sum())
        totals["lane_marking"] += int(ref["lane_marking"].sum())
        totals["yellow"] += int(ref["road_divider_marking"].sum())
        totals["yellow_hit"] += int((out[ref["road_divider_marking"]] == ids["road_divider"]).sum())
    # the double yellow line (0.36 m wide) is mostly inside the 0.3 m road_divider band
    assert totals["yellow"] > 0 and totals["yellow_hit"] / totals["yellow"] > 0.6
    assert totals["boundary"] > 0 and totals["lane_marking"] > 0


# ---- rules at the edges: clip margin, line ends and joins, invalid map polygons, errors -------


def test_outline_of_a_road_larger_than_a_coarse_grid_draws_nothing_inside_it() -> None:
    """The clip box reaches far enough beyond the grid (2 line widths + 2 cells + 1 m, documented)
    that its cut edges never become boundary: with 1 m cells, and with 5 m wide lines."""
    coarse = BEVGrid(x_min=-8.0, x_max=8.0, y_min=-8.0, y_max=8.0, resolution=1.0)
    wide = BEVClassSet(name="wide", classes=HDMAP.classes, layers=HDMAP.layers, line_width_m=5.0)
    road = shapely.box(-500, -500, 500, 500)
    elements = {"road_segment": [road], "lane": [], "ped_crossing": [], "lane_divider": [], "road_divider": []}
    for grid, class_set in ((coarse, HDMAP), (DEMO, wide)):
        out = rasterize_sample(elements, pose(0.0, 1.0, 2.0), grid, class_set)
        assert not out.any()
    # the same road ending inside the grid (on the centres x = 5.5): its outline is drawn there, and only there
    elements["road_segment"] = [shapely.box(-500, -500, 5.5, 500)]
    out = rasterize_sample(elements, np.eye(4), coarse, HDMAP)
    x, _ = centres(coarse)
    assert np.array_equal(out == 1, x == 5.5)


def test_lines_have_flat_ends_at_their_end_points_and_round_joins() -> None:
    """Divider bands (hdmapnet class 3) end exactly at the end points, and the outside of a
    right-angle turn is round: a cell centre on the turn's bisector at 0.995 half-widths from the
    corner is painted, one just past the end point of the line (by less than a half-width) is not."""
    h = HDMAP.line_width_m / 2
    # DEMO cell centres sit at x = -15.875 + 0.25 i, y = -7.875 + 0.25 j, e.g. (0.125, 0.125)
    end = shapely.LineString([(-5.0, 0.125), (1.0, 0.125)])  # centre x = 1.125 lies 0.125 m past the end
    elements = {"road_segment": [], "lane": [], "ped_crossing": [], "lane_divider": [end], "road_divider": []}
    out = rasterize_sample(elements, np.eye(4), DEMO, HDMAP)
    x, y = centres(DEMO)
    row = np.isclose(y, 0.125)
    assert (out[row & np.isclose(x, 0.875)] == 3).all() and (out[row & np.isclose(x, -4.875)] == 3).all()
    assert (out[row & np.isclose(x, 1.125)] == 0).all() and (out[row & np.isclose(x, -5.125)] == 0).all()
    # a left turn at corner c: going +x, then +y; the outside of the turn is towards (+x, -y)
    d = 0.995 * h / np.sqrt(2)
    c = (0.125 - d, 0.125 + d)
    turn = shapely.LineString([(c[0] - 3, c[1]), c, (c[0], c[1] + 3)])
    elements["lane_divider"] = [turn]
    out = rasterize_sample(elements, np.eye(4), DEMO, HDMAP)
    on_bisector = np.isclose(x, 0.125) & np.isclose(y, 0.125)
    assert (out[on_bisector] == 3).all()
    # ... and the neighbours outside the join stay empty
    assert (out[np.isclose(x, 0.375) & np.isclose(y, 0.125)] == 0).all()
    assert (out[np.isclose(x, 0.125) & np.isclose(y, -0.125)] == 0).all()


def test_outline_stays_straight_across_a_closed_gap() -> None:
    """The 5 cm closing uses mitred corners (documented): two road pieces 8 cm apart become one
    road whose edge runs straight across the closed gap (no notch where the gap was), so the
    outline band reaches a centre 0.145 m (< half the 0.3 m line width) beyond the edge there."""
    edge = 0.125 - 0.145  # the centre (0.125, 0.125) lies 0.145 m beyond the road edge y = edge
    left, right = shapely.box(-100, -100, 0.125 - 0.04, edge), shapely.box(0.125 + 0.04, -100, 100, edge)
    elements = {"road_segment": [left, right], "lane": [], "ped_crossing": [], "lane_divider": [],
                "road_divider": []}
    out = rasterize_sample(elements, np.eye(4), DEMO, HDMAP)
    x, y = centres(DEMO)
    pts = shapely.points(x, y)
    expected = shapely.distance(shapely.box(-100, -100, 100, edge).boundary, pts) < HDMAP.line_width_m / 2
    assert expected[np.isclose(x, 0.125) & np.isclose(y, 0.125)].all()
    assert np.array_equal(out == 1, expected)


def test_self_intersecting_map_polygon_is_outlined_as_the_area_it_encloses() -> None:
    """A bow-tie road record (invalid polygon, as hand-drawn map data can hold) is repaired, not
    dropped: its outline is the boundary of its two triangles."""
    bowtie = shapely.Polygon([(-10, -6), (10, 6), (10, -6), (-10, 6)])
    assert not bowtie.is_valid
    elements = {"road_segment": [bowtie], "lane": [], "ped_crossing": [], "lane_divider": [], "road_divider": []}
    out = rasterize_sample(elements, np.eye(4), DEMO, HDMAP)
    x, y = centres(DEMO)
    area = shapely.make_valid(bowtie)
    expected = shapely.distance(area.boundary, shapely.points(x, y)) < HDMAP.line_width_m / 2
    assert expected.sum() > 100
    assert np.array_equal(out == 1, expected)


def test_a_layer_missing_from_the_map_draws_nothing_and_bad_rules_are_named() -> None:
    """A map without some layer of the class set (e.g. no lane dividers at all) still rasterises."""
    elements = {"road_divider": [shapely.LineString([(-5.0, 0.125), (1.0, 0.125)])]}  # no other layer
    out = rasterize_sample(elements, np.eye(4), DEMO, HDMAP)
    assert set(np.unique(out)) == {0, 3}
    bad = BEVClassSet(name="bad", classes=("x",), layers={"x": {"dots": ("lane",)}})
    with pytest.raises(BevctlError, match=r"^class set 'bad': class 'x' has unknown rule 'dots' "
                                          r"\(allowed: lines, polygons, outline\)$"):
        required_layers(bad)
    with pytest.raises(BevctlError, match=r"^class set 'bad': class 'x' has unknown rule 'dots'$"):
        rasterize_sample(elements, np.eye(4), DEMO, bad)


def test_empty_map_records_are_skipped_and_the_rest_drawn() -> None:
    """An empty geometry (e.g. a degenerate record) among a layer's records draws nothing and
    does not stop the records after it from being drawn."""
    crossing = shapely.box(-2.0, -2.0, 2.0, 2.0)
    elements = {"ped_crossing": [shapely.Polygon(), shapely.MultiPolygon(), crossing]}
    out = rasterize_sample(elements, np.eye(4), DEMO, HDMAP)
    assert np.array_equal(out == 2, reference_mask([crossing], np.eye(4), DEMO)) and set(np.unique(out)) == {0, 2}
    elements = {"ped_crossing": [shapely.Polygon()]}  # nothing but an empty record
    assert not rasterize_sample(elements, np.eye(4), DEMO, HDMAP).any()
    cell_T = cell_T_global(np.eye(4), DEMO)
    # nothing, a record far outside the grid, a sliver between two rows of cell centres (x = 0.125, 0.375)
    for polygons in ([shapely.Polygon()], [shapely.box(100, 100, 120, 120)], [shapely.box(0.15, -5, 0.35, 5)]):
        mask = fill_polygons(polygons, DEMO.shape, cell_T)
        assert mask.dtype == bool and mask.shape == DEMO.shape and not mask.any()
    far = {"ped_crossing": [shapely.box(100, 100, 120, 120)]}
    assert not rasterize_sample(far, np.eye(4), DEMO, HDMAP).any()


def test_a_class_set_too_large_for_uint8_labels_is_refused() -> None:
    """Ids are 1..len(classes) in uint8 with 255 reserved for ignore: 254 classes fit (the last one
    is painted 254), 255 do not."""
    def class_set(n: int) -> BEVClassSet:
        classes = tuple(f"c{i}" for i in range(n))
        return BEVClassSet(name=f"n{n}", classes=classes, layers={c: {"polygons": ("lane",)} for c in classes})

    crossing = shapely.box(-2.0, -2.0, 2.0, 2.0)
    out = rasterize_sample({"lane": [crossing]}, np.eye(4), DEMO, class_set(254))
    assert set(np.unique(out)) == {0, 254}  # every class draws the same lane; the last one wins
    for n in (255, 256):
        with pytest.raises(BevctlError, match=rf"^class set 'n{n}': too many classes for uint8$"):
            rasterize_sample({}, np.eye(4), DEMO, class_set(n))
