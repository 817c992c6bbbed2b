"""Vector geometry of the synthetic world: class polygons and the nuScenes map expansion.

Both are built from the same local layout as :meth:`World.classify`, so rasterising the
polygons in class order (:data:`PAINT_ORDER`, later wins) reproduces the classifier exactly.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import LineString, Polygon, box
from shapely.ops import unary_union

from bevctl.data.synth_world import (
    SIDE,
    SYNTH_CLASSES,
    Segment,
    World,
    approach_marks,
    marking_range,
    segments,
    street_rect,
    street_to_local,
    token,
)

# Ground classes in painting order: a point takes the class of the last polygon containing it;
# points in none of them are other_ground.
PAINT_ORDER: tuple[str, ...] = (
    "sidewalk",
    "road",
    "curb",  # centred on the road edge: its inner half lies on the road
    "lane_marking",
    "road_divider_marking",
    "crosswalk",
    "stop_line",
)

HEADINGS = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # h = 0:+x 1:+y 2:-x 3:-y


def _rect(world: World, seg: Segment, a0: float, a1: float, l0: float, l1: float) -> Polygon:
    return Polygon(street_rect(world, seg.kind, seg.k, a0, a1, l0, l1))


def _to_global(world: World, geom):
    c, s = math.cos(world.theta), math.sin(world.theta)
    return affinity.affine_transform(geom, [c, -s, s, c, world.origin[0], world.origin[1]])


def _interval_union(pieces: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in pieces):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _divider_intervals(world: World, seg: Segment) -> list[tuple[float, float]]:
    """Along-intervals where a white lane divider is painted on this segment."""
    mk = world.mk
    st = world.street(seg.kind)
    lo, hi = marking_range(world, seg)
    if hi <= lo:
        return []
    if st.full_solid[seg.k]:
        return [(lo, hi)]
    pieces = [am["solid"] for am in approach_marks(world, seg)]
    phase = float(st.phase[seg.k])
    m0 = math.floor((lo + phase) / mk.dash_period) - 1
    m1 = math.ceil((hi + phase) / mk.dash_period) + 1
    for m in range(m0, m1 + 1):
        a = m * mk.dash_period - phase
        pieces.append((a, a + mk.dash_len))
    return _interval_union(pieces, lo, hi)


def local_class_geometry(world: World) -> dict[str, list[Polygon]]:
    """Polygons per ground class in the *local* frame (see :data:`PAINT_ORDER`)."""
    mk = world.mk
    out: dict[str, list[Polygon]] = {name: [] for name in PAINT_ORDER}
    # sidewalks: lateral bands along every built segment, outside all roads
    walk = []
    for seg in segments(world):
        st = world.street(seg.kind)
        other = world.rows if seg.kind == "col" else world.cols
        hw, sw = float(st.hw[seg.k]), float(st.sw[seg.k])
        # bands run to the crossing centres: beside a T-junction's missing arm they continue
        lo = seg.a0 if seg.cross0 is None else float(other.c[seg.cross0])
        hi = seg.a1 if seg.cross1 is None else float(other.c[seg.cross1])
        walk.append(_rect(world, seg, lo, hi, -hw - mk.curb_w - sw, hw + mk.curb_w + sw))
    roads = [_rect(world, seg, seg.a0, seg.a1, -float(world.street(seg.kind).hw[seg.k]), float(world.street(seg.kind).hw[seg.k]))
             for seg in segments(world)]
    roads += [_intersection(world, i, j) for i in range(len(world.rows.c)) for j in range(len(world.cols.c))]
    road_u = unary_union(roads)
    kerb_u = _curb_band(world, roads)
    out["curb"] = _polys(kerb_u)
    out["sidewalk"] = _polys(unary_union(walk).difference(road_u).difference(kerb_u))
    world_rect = box(0, 0, world.size[0], world.size[1])
    for seg in segments(world):
        st = world.street(seg.kind)
        hw, w, n = float(st.hw[seg.k]), float(st.w[seg.k]), int(st.n[seg.k])
        out["road"].append(_rect(world, seg, seg.a0, seg.a1, -hw, hw))
        lo, hi = marking_range(world, seg)
        if hi > lo:
            g, yw = mk.yellow_gap / 2, mk.yellow_w
            out["road_divider_marking"].append(_rect(world, seg, lo, hi, g, g + yw))
            out["road_divider_marking"].append(_rect(world, seg, lo, hi, -g - yw, -g))
        for a, b in _divider_intervals(world, seg):
            for q in range(1, n):
                for sgn in (-1.0, 1.0):
                    c = sgn * q * w
                    out["lane_marking"].append(_rect(world, seg, a, b, c - mk.line_w / 2, c + mk.line_w / 2))
        for am in approach_marks(world, seg):
            if am["cw"] is not None:
                out["crosswalk"].append(_rect(world, seg, *am["cw"], -hw, hw))
            if am["stop"] is not None:
                l0, l1 = (0.0, hw) if am["incoming_sign"] > 0 else (-hw, 0.0)
                out["stop_line"].append(_rect(world, seg, *am["stop"], l0, l1))
    # intersections are plain road
    for i in range(len(world.rows.c)):
        for j in range(len(world.cols.c)):
            out["road"].append(_intersection(world, i, j))
    return {k: [p.intersection(world_rect) for p in v if not p.is_empty] for k, v in out.items()}


def _curb_band(world: World, roads: list[Polygon]):
    """The curb: the road (streets extended past the world's border, so it has no edge there)
    dilated minus eroded by a cross of radius ``curb_w / 2`` along local x and y -- a band of
    width ``curb_w`` centred on the road edge, as :meth:`World.classify` computes it."""
    h = world.mk.curb_w / 2
    ext = []
    for seg in segments(world):
        hw = float(world.street(seg.kind).hw[seg.k])
        a0 = seg.a0 - 1.0 if seg.cross0 is None else seg.a0
        a1 = seg.a1 + 1.0 if seg.cross1 is None else seg.a1
        ext.append(_rect(world, seg, a0, a1, -hw, hw))
    road = unary_union(ext + roads)
    moved = [affinity.translate(road, ox, oy) for ox, oy in ((h, 0.0), (-h, 0.0), (0.0, h), (0.0, -h))]
    grown = unary_union([road] + moved)
    shrunk = road
    for m in moved:
        shrunk = shrunk.intersection(m)
    return grown.difference(shrunk)


def _intersection(world: World, i: int, j: int) -> Polygon:
    cx, hx = float(world.cols.c[j]), float(world.cols.hw[j])
    cy, hy = float(world.rows.c[i]), float(world.rows.hw[i])
    return box(cx - hx, cy - hy, cx + hx, cy + hy)


def world_polygons(world: World) -> dict[str, list[Polygon]]:
    """Polygons per ground class in *global* coordinates, merged per class."""
    out = {}
    for name, polys in local_class_geometry(world).items():
        merged = unary_union(polys)
        geoms = list(merged.geoms) if hasattr(merged, "geoms") else [merged]
        out[name] = [_to_global(world, g) for g in geoms if isinstance(g, Polygon) and not g.is_empty]
    return out


def world_json(world: World) -> dict:
    """``bevctl_world.json``: the world's own geometry for tests and tools (global frame)."""
    polys = world_polygons(world)
    return {
        "about": "Synthetic world ground-truth geometry (global frame). A ground point's class is the "
        "last class in paint_order whose polygons contain it, else other_ground.",
        "classes": list(SYNTH_CLASSES),
        "paint_order": list(PAINT_ORDER),
        "polygons": {
            name: [
                [np.round(np.asarray(p.exterior.coords), 6).tolist()]
                + [np.round(np.asarray(h.coords), 6).tolist() for h in p.interiors]
                for p in plist
            ]
            for name, plist in polys.items()
        },
        "world": {
            "size": list(world.size),
            "theta": world.theta,
            "origin": list(world.origin),
            "canvas": list(world.canvas),
            "seed": world.seed,
        },
    }


# --------------------------------------------------------------------------------------------
# Lane geometry shared by routes and lane connectors
# --------------------------------------------------------------------------------------------


def heading_street(h: int, i: int, j: int) -> tuple[str, int, float]:
    """(street kind, street index, along sign) of heading ``h`` through intersection (i, j)."""
    if h in (0, 2):
        return "row", i, 1.0 if h == 0 else -1.0
    return "col", j, 1.0 if h == 1 else -1.0


def lane_lateral(world: World, kind: str, k: int, sigma: float, q: int) -> float:
    """Lateral offset of lane ``q`` (0 = next to the centre line) for travel along ``sigma``."""
    w = float(world.street(kind).w[k])
    return sigma * SIDE * (q + 0.5) * w


def edge_point(world: World, i: int, j: int, h: int, q: int, entering: bool) -> np.ndarray:
    """Local point where lane ``q`` of heading ``h`` enters / leaves intersection (i, j)."""
    kind, k, sigma = heading_street(h, i, j)
    lat = lane_lateral(world, kind, k, sigma, q)
    if kind == "row":
        cx, hx = float(world.cols.c[j]), float(world.cols.hw[j])
        x = cx - sigma * hx if entering else cx + sigma * hx
        return np.array(street_to_local(world, "row", i, x, lat))
    cy, hy = float(world.rows.c[i]), float(world.rows.hw[i])
    y = cy - sigma * hy if entering else cy + sigma * hy
    return np.array(street_to_local(world, "col", j, y, lat))


def neighbour(world: World, i: int, j: int, h: int) -> tuple[int, int] | None:
    di, dj = {0: (0, 1), 1: (1, 0), 2: (0, -1), 3: (-1, 0)}[h]
    i2, j2 = i + di, j + dj
    if not (0 <= i2 < len(world.rows.c) and 0 <= j2 < len(world.cols.c)):
        return None
    # segment m of a street lies between crossings m-1 and m
    built = world.rows.seg_exists[i, max(j, j2)] if h in (0, 2) else world.cols.seg_exists[j, max(i, i2)]
    return (i2, j2) if built else None


def connector_path(p0: np.ndarray, h0: int, p1: np.ndarray, h1: int, step: float = 0.25):
    """Polyline (N, 2) + headings (N,) + arcline dict (local frame) from p0 (heading h0) to p1 (h1)."""
    d0, d1 = HEADINGS[h0], HEADINGS[h1]
    if h0 == h1:
        length = float(np.dot(p1 - p0, d0))
        n = max(2, int(math.ceil(length / step)) + 1)
        t = np.linspace(0.0, length, n)
        pts = p0[None] + t[:, None] * d0[None]
        yaw = np.full(n, math.atan2(d0[1], d0[0]))
        arc = dict(shape="LSR", radius=999.0, segment_length=[0.0, length, 0.0])
        return pts, yaw, arc
    a = float(np.dot(p1 - p0, d0))
    b = float(np.dot(p1 - p0, d1))
    corner = p0 + a * d0
    r = min(a, b)
    left = d0[0] * d1[1] - d0[1] * d1[0] > 0
    centre = corner + r * (d1 - d0)
    yaw0 = math.atan2(d0[1], d0[0])
    turn = math.pi / 2 if left else -math.pi / 2
    pieces, yaws = [], []
    s1 = a - r
    if s1 > 1e-9:
        t = np.linspace(0.0, s1, max(2, int(math.ceil(s1 / step)) + 1))[:-1]
        pieces.append(p0[None] + t[:, None] * d0[None])
        yaws.append(np.full(len(t), yaw0))
    n_arc = max(3, int(math.ceil(r * math.pi / 2 / step)) + 1)
    phi = np.linspace(0.0, math.pi / 2, n_arc)
    pieces.append(centre[None] + r * (-np.cos(phi)[:, None] * d1[None] + np.sin(phi)[:, None] * d0[None]))
    yaws.append(yaw0 + turn * phi / (math.pi / 2))
    s3 = b - r
    if s3 > 1e-9:
        t = np.linspace(0.0, s3, max(2, int(math.ceil(s3 / step)) + 1))[1:]
        pieces.append((corner + r * d1)[None] + t[:, None] * d1[None])
        yaws.append(np.full(len(t), yaw0 + turn))
    arc_len = r * math.pi / 2
    seglen = [arc_len, s3, 0.0] if s1 <= 1e-9 else [0.0, s1, arc_len]
    arc = dict(shape="LSL" if left else "RSR", radius=r, segment_length=seglen)
    return np.concatenate(pieces), np.concatenate(yaws), arc


# --------------------------------------------------------------------------------------------
# nuScenes map expansion (v1.3)
# --------------------------------------------------------------------------------------------


class _MapBuilder:
    def __init__(self, world: World) -> None:
        self.world = world
        self.layers: dict[str, list] = {
            k: []
            for k in (
                "node",
                "line",
                "polygon",
                "drivable_area",
                "road_segment",
                "road_block",
                "lane",
                "ped_crossing",
                "walkway",
                "stop_line",
                "carpark_area",
                "road_divider",
                "lane_divider",
                "traffic_light",
                "lane_connector",
            )
        }
        self.arcline: dict[str, list] = {}
        self.connectivity: dict[str, dict] = {}
        self.n = 0

    def tok(self, *parts: object) -> str:
        self.n += 1
        return token("map", self.world.seed, self.n, *parts)

    def node(self, x: float, y: float) -> str:
        t = self.tok("node")
        self.layers["node"].append({"token": t, "x": round(float(x), 6), "y": round(float(y), 6)})
        return t

    def polygon(self, poly: Polygon) -> str:
        """Add a *global* polygon; returns its token."""
        poly = shapely.geometry.polygon.orient(poly, 1.0)
        ext = [self.node(x, y) for x, y in list(poly.exterior.coords)[:-1]]
        holes = [{"node_tokens": [self.node(x, y) for x, y in list(h.coords)[:-1]]} for h in poly.interiors]
        t = self.tok("polygon")
        self.layers["polygon"].append({"token": t, "exterior_node_tokens": ext, "holes": holes})
        return t

    def line(self, coords) -> tuple[str, list[str]]:
        nodes = [self.node(x, y) for x, y in coords]
        t = self.tok("line")
        self.layers["line"].append({"token": t, "node_tokens": nodes})
        return t, nodes

    def g(self, geom):
        return _to_global(self.world, geom)

    def pose(self, p: np.ndarray, yaw: float) -> list[float]:
        gx, gy = self.world.to_global(np.array(p[0]), np.array(p[1]))
        return [round(float(gx), 6), round(float(gy), 6), round(float(yaw + self.world.theta), 9)]


def build_map_expansion(world: World) -> dict:
    """The nuScenes map-expansion JSON (v1.3 layers) of the world, in global coordinates."""
    b = _MapBuilder(world)
    mk = world.mk
    world_rect = box(0, 0, world.size[0], world.size[1])
    geo = local_class_geometry(world)
    drivable = unary_union(geo["road"])
    da_polys = _polys(drivable)
    da_token = b.tok("drivable_area")
    b.layers["drivable_area"].append(
        {"token": da_token, "polygon_tokens": [b.polygon(b.g(p)) for p in da_polys]}
    )
    for poly in _polys(unary_union(geo["sidewalk"]).difference(unary_union(geo["curb"]))):
        if poly.area > 1e-6:
            b.layers["walkway"].append({"token": b.tok("walkway"), "polygon_token": b.polygon(b.g(poly))})

    # intersections
    inter_tok: dict[tuple[int, int], str] = {}
    for i in range(len(world.rows.c)):
        for j in range(len(world.cols.c)):
            t = b.tok("road_segment", i, j)
            inter_tok[(i, j)] = t
            b.layers["road_segment"].append(
                {
                    "token": t,
                    "polygon_token": b.polygon(b.g(_intersection(world, i, j))),
                    "is_intersection": True,
                    "drivable_area_token": da_token,
                }
            )

    # lanes keyed by (kind, street, along-sign, crossing before, q) -> token, for connectivity
    lane_in: dict[tuple, str] = {}  # lane arriving at intersection (i, j, heading, q)
    lane_out: dict[tuple, str] = {}  # lane leaving intersection (i, j, heading, q)
    for seg in segments(world):
        st = world.street(seg.kind)
        hw, w, n = float(st.hw[seg.k]), float(st.w[seg.k]), int(st.n[seg.k])
        rs_poly = _rect(world, seg, seg.a0, seg.a1, -hw, hw).intersection(world_rect)
        if rs_poly.is_empty or rs_poly.area < 1e-6:
            continue
        rs = b.tok("road_segment")
        b.layers["road_segment"].append(
            {"token": rs, "polygon_token": b.polygon(b.g(rs_poly)), "is_intersection": False, "drivable_area_token": da_token}
        )
        lo, hi = marking_range(world, seg)
        if hi > lo:
            centre = LineString([street_to_local(world, seg.kind, seg.k, a, 0.0) for a in (lo, hi)])
            lt, _ = b.line(b.g(centre).coords)
            b.layers["road_divider"].append({"token": b.tok("road_divider"), "line_token": lt, "road_segment_token": rs})
            for q in range(1, n):
                for sgn in (-1.0, 1.0):
                    ln = LineString([street_to_local(world, seg.kind, seg.k, a, sgn * q * w) for a in (lo, hi)])
                    kind_t = "SINGLE_SOLID_WHITE" if st.full_solid[seg.k] else "DOUBLE_DASHED_WHITE"
                    lt, nodes = b.line(b.g(ln).coords)
                    b.layers["lane_divider"].append(
                        {
                            "token": b.tok("lane_divider"),
                            "line_token": lt,
                            "lane_divider_segments": [{"node_token": nt, "segment_type": kind_t} for nt in nodes],
                        }
                    )
        block_tok = {}
        for sigma in (1.0, -1.0):
            l0, l1 = (0.0, hw) if sigma * SIDE > 0 else (-hw, 0.0)
            a_start, a_end = (seg.a0, seg.a1) if sigma > 0 else (seg.a1, seg.a0)

            def edge_line(a: float, la: float, lb: float) -> str:
                ln = LineString([street_to_local(world, seg.kind, seg.k, a, la), street_to_local(world, seg.kind, seg.k, a, lb)])
                return b.line(b.g(ln).coords)[0]

            bt = b.tok("road_block")
            block_tok[sigma] = bt
            b.layers["road_block"].append(
                {
                    "token": bt,
                    "polygon_token": b.polygon(b.g(_rect(world, seg, seg.a0, seg.a1, l0, l1))),
                    "from_edge_line_token": edge_line(a_start, l0, l1),
                    "to_edge_line_token": edge_line(a_end, l0, l1),
                    "road_segment_token": rs,
                }
            )
            for q in range(n):
                lat = lane_lateral(world, seg.kind, seg.k, sigma, q)
                la, lb = lat - w / 2, lat + w / 2
                lt = b.tok("lane")
                left_nodes = [
                    b.node(*b.pose(np.array(street_to_local(world, seg.kind, seg.k, a, lat + sigma * w / 2)), 0.0)[:2])
                    for a in (a_start, a_end)
                ]
                right_nodes = [
                    b.node(*b.pose(np.array(street_to_local(world, seg.kind, seg.k, a, lat - sigma * w / 2)), 0.0)[:2])
                    for a in (a_start, a_end)
                ]
                left_type = "DOUBLE_SOLID_YELLOW" if q == 0 else "DOUBLE_DASHED_WHITE"
                right_type = "NIL" if q == n - 1 else "DOUBLE_DASHED_WHITE"
                b.layers["lane"].append(
                    {
                        "token": lt,
                        "polygon_token": b.polygon(b.g(_rect(world, seg, seg.a0, seg.a1, la, lb))),
                        "lane_type": "CAR",
                        "from_edge_line_token": edge_line(a_start, la, lb),
                        "to_edge_line_token": edge_line(a_end, la, lb),
                        "left_lane_divider_segments": [{"node_token": t, "segment_type": left_type} for t in left_nodes],
                        "right_lane_divider_segments": [{"node_token": t, "segment_type": right_type} for t in right_nodes],
                    }
                )
                p_start = np.array(street_to_local(world, seg.kind, seg.k, a_start, lat))
                p_end = np.array(street_to_local(world, seg.kind, seg.k, a_end, lat))
                d = p_end - p_start
                yaw = math.atan2(d[1], d[0])
                length = float(np.linalg.norm(d))
                b.arcline[lt] = [
                    {
                        "start_pose": b.pose(p_start, yaw),
                        "end_pose": b.pose(p_end, yaw),
                        "shape": "LSR",
                        "radius": 999.0,
                        "segment_length": [0.0, length, 0.0],
                    }
                ]
                b.connectivity[lt] = {"incoming": [], "outgoing": []}
                h = _heading_of(seg.kind, sigma)
                cross_start, cross_end = (seg.cross0, seg.cross1) if sigma > 0 else (seg.cross1, seg.cross0)
                if cross_end is not None:
                    ij = (cross_end, seg.k) if seg.kind == "col" else (seg.k, cross_end)
                    lane_in[(ij, h, q)] = lt
                if cross_start is not None:
                    ij = (cross_start, seg.k) if seg.kind == "col" else (seg.k, cross_start)
                    lane_out[(ij, h, q)] = lt
        for am in approach_marks(world, seg):
            pc = None
            if am["cw"] is not None:
                pc = b.tok("ped_crossing")
                b.layers["ped_crossing"].append(
                    {"token": pc, "polygon_token": b.polygon(b.g(_rect(world, seg, *am["cw"], -hw, hw))), "road_segment_token": rs}
                )
            if am["stop"] is not None:
                l0, l1 = (0.0, hw) if am["incoming_sign"] > 0 else (-hw, 0.0)
                tls = []
                if pc is None:
                    # a traffic light on the kerb beside the stop line, facing the incoming lanes
                    lat = am["incoming_sign"] * (hw + 0.5)
                    a = am["edge"] + am["sgn"] * (mk.cw_gap + 0.5)
                    p_a = street_to_local(world, seg.kind, seg.k, a, lat)
                    p_b = street_to_local(world, seg.kind, seg.k, a + am["sgn"] * 0.5, lat)
                    lt, _ = b.line(b.g(LineString([p_a, p_b])).coords)
                    gx, gy = world.to_global(np.array(p_a[0]), np.array(p_a[1]))
                    along_yaw = (0.0 if seg.kind == "row" else math.pi / 2) + (0.0 if am["sgn"] > 0 else math.pi)
                    tl = b.tok("traffic_light")
                    tls.append(tl)
                    b.layers["traffic_light"].append(
                        {
                            "token": tl,
                            "line_token": lt,
                            "traffic_light_type": "VERTICAL",
                            "from_road_block_token": block_tok[-am["sgn"]],
                            "items": [
                                {"color": c, "shape": "CIRCLE", "rel_pos": {"tx": 0.0, "ty": 0.0, "tz": z, "rx": 0.0, "ry": 0.0, "rz": 0.0}, "to_road_block_tokens": []}
                                for c, z in (("RED", 0.6), ("YELLOW", 0.3), ("GREEN", 0.0))
                            ],
                            "pose": {"tx": round(float(gx), 6), "ty": round(float(gy), 6), "tz": 2.5, "rx": 0.0, "ry": 0.0,
                                     "rz": round(along_yaw + world.theta, 9)},
                        }
                    )
                b.layers["stop_line"].append(
                    {
                        "token": b.tok("stop_line"),
                        "polygon_token": b.polygon(b.g(_rect(world, seg, *am["stop"], l0, l1))),
                        "stop_line_type": "PED_CROSSING" if pc else "TRAFFIC_LIGHT",
                        "ped_crossing_tokens": [pc] if pc else [],
                        "traffic_light_tokens": tls,
                        "road_block_token": block_tok[-am["sgn"]],
                    }
                )

    # lane connectors through every intersection
    for (ij, h, q), lt_in in sorted(lane_in.items()):
        i, j = ij
        for h2 in (h, (h + 1) % 4, (h + 3) % 4):
            kind2, k2, _ = heading_street(h2, i, j)
            q2 = min(q, int(world.street(kind2).n[k2]) - 1)
            lt_out = lane_out.get((ij, h2, q2))
            if lt_out is None:
                continue
            p0 = edge_point(world, i, j, h, q, entering=True)
            p1 = edge_point(world, i, j, h2, q2, entering=False)
            pts, yaws, arc = connector_path(p0, h, p1, h2)
            w2 = float(world.street(kind2).w[k2])
            poly = LineString(pts).buffer(w2 / 2, cap_style="flat")
            ct = b.tok("lane_connector")
            b.layers["lane_connector"].append({"token": ct, "polygon_token": b.polygon(b.g(poly))})
            b.arcline[ct] = [dict(start_pose=b.pose(p0, float(yaws[0])), end_pose=b.pose(p1, float(yaws[-1])), **arc)]
            b.connectivity[ct] = {"incoming": [lt_in], "outgoing": [lt_out]}
            b.connectivity[lt_in]["outgoing"].append(ct)
            b.connectivity[lt_out]["incoming"].append(ct)

    out = dict(b.layers)
    out["arcline_path_3"] = b.arcline
    out["connectivity"] = b.connectivity
    out["canvas_edge"] = [round(world.canvas[0], 3), round(world.canvas[1], 3)]
    out["version"] = "1.3"
    return out


def _polys(geom) -> list[Polygon]:
    parts = list(geom.geoms) if hasattr(geom, "geoms") else [geom]
    return [p for p in parts if isinstance(p, Polygon) and not p.is_empty]


def _heading_of(kind: str, sigma: float) -> int:
    if kind == "row":
        return 0 if sigma > 0 else 2
    return 1 if sigma > 0 else 3


def map_mask(world: World, resolution: float = 0.1) -> np.ndarray:
    """The map table's semantic prior PNG (drivable area + walkways = 255), nuScenes pixel layout."""
    w = int(math.ceil(world.canvas[0] / resolution))
    h = int(math.ceil(world.canvas[1] / resolution))
    img = np.zeros((h, w), np.uint8)
    geo = local_class_geometry(world)
    for poly in geo["road"] + geo["curb"] + geo["sidewalk"]:
        for p in (list(poly.geoms) if hasattr(poly, "geoms") else [poly]):
            if p.is_empty:
                continue
            gp = _to_global(world, p)
            ext = np.asarray(gp.exterior.coords)
            pix = np.stack([ext[:, 0] / resolution, h - ext[:, 1] / resolution], 1)
            cv2.fillPoly(img, [np.round(pix).astype(np.int32)], 255)
            for hole in gp.interiors:
                hc = np.asarray(hole.coords)
                hp = np.stack([hc[:, 0] / resolution, h - hc[:, 1] / resolution], 1)
                cv2.fillPoly(img, [np.round(hp).astype(np.int32)], 0)
    return img
