"""The synthetic world: a procedural Manhattan-style road network on flat ground.

Everything is defined analytically in a *local* world frame (streets along local x and y),
then rotated by ``theta`` and shifted by ``origin`` into the nuScenes *global* frame, so roads
are not axis-aligned in global coordinates. One definition serves three consumers, which
therefore agree exactly:

* :meth:`World.classify` -- the ground class (and paint) of any global point (used by the renderer);
* :func:`world_polygons` -- shapely polygons per ground class (``bevctl_world.json``, tests);
* :func:`build_map_expansion` -- the nuScenes map expansion (v1.3 layers) of the same world.

Streets: ``cols`` run along local y at ``x = col_c[j]``; ``rows`` run along local x at
``y = row_c[i]``. Each street has ``n`` lanes per direction of width ``w``, a double yellow
centre line, white lane dividers (dashed, solid near intersections, or fully solid), a 0.3 m
curb strip centred on the road edge (half on the road, half outside; like the nuScenes / HDMapNet
boundary band), then a sidewalk.  The road itself (drivable area, map polygons) still ends at the
road edge: the curb's inner half is painted over the road surface. Traffic keeps left (Singapore).
Every intersection approach may have a zebra crossing and a stop line on its incoming lanes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

# Fixed synthetic image classes (ids = positions).
SYNTH_CLASSES: tuple[str, ...] = (
    "sky",
    "road",
    "lane_marking",
    "road_divider_marking",
    "crosswalk",
    "stop_line",
    "curb",
    "sidewalk",
    "other_ground",
    "vehicle",
)
SKY, ROAD, LANE, YELLOW, CROSSWALK, STOP, CURB, SIDEWALK, OTHER, VEHICLE = range(10)

# Paint codes returned by World.classify (texture only; the class is the label).
PAINT_NONE, PAINT_WHITE, PAINT_YELLOW = 0, 1, 2

SIDE = 1.0  # +1: traffic keeps left (lanes of heading d lie to the left of the centre line)


@dataclass(frozen=True)
class MarkingSpec:
    """Sizes of markings along a street approach (metres)."""

    curb_w: float = 0.3  # curb strip centred on the road edge (curb_w / 2 on either side)
    cw_gap: float = 1.0  # intersection edge -> crosswalk start
    cw_len: float = 4.0  # crosswalk length along the street
    stop_gap: float = 1.0  # crosswalk end -> stop line start
    stop_w: float = 0.4  # stop line width
    mark_gap: float = 1.0  # stop line end -> start of lane / centre markings
    solid_len: float = 12.0  # dividers are solid this far past the marking start
    dash_len: float = 3.0
    dash_period: float = 8.0
    line_w: float = 0.15  # white lane divider width
    yellow_w: float = 0.12  # each of the two yellow centre lines
    yellow_gap: float = 0.12  # gap between the two yellow lines
    zebra_w: float = 0.5  # zebra stripe width (stripes alternate with gaps of the same width)

    @property
    def mark_start(self) -> float:
        """Distance from the intersection edge where lane / centre markings begin."""
        return self.cw_gap + self.cw_len + self.stop_gap + self.stop_w + self.mark_gap


@dataclass
class Streets:
    """One family of parallel streets (all cols or all rows)."""

    c: np.ndarray  # (K,) centre coordinate across the street
    n: np.ndarray  # (K,) lanes per direction
    w: np.ndarray  # (K,) lane width
    sw: np.ndarray  # (K,) sidewalk width
    phase: np.ndarray  # (K,) dash phase
    full_solid: np.ndarray  # (K,) bool: dividers solid all along
    wear: np.ndarray  # (K,) paint wear in [0, 1)
    has_cw: np.ndarray  # (K, M, 2) bool: crosswalk at crossing m on side (0: s=-1, 1: s=+1)
    has_stop: np.ndarray  # (K, M, 2) bool: stop line on that approach
    seg_exists: np.ndarray  # (K, M + 1) bool: segment m (between crossings m-1 and m) is built

    @property
    def hw(self) -> np.ndarray:
        return self.n * self.w


@dataclass
class World:
    size: tuple[float, float]  # local extent (Wx, Wy); the world is [0, Wx] x [0, Wy]
    theta: float  # local -> global rotation (rad)
    origin: tuple[float, float]  # global position of local (0, 0)
    canvas: tuple[float, float]  # map canvas (global), all geometry inside [0, cx] x [0, cy]
    cols: Streets  # streets along local y, centre x = cols.c
    rows: Streets  # streets along local x, centre y = rows.c
    mk: MarkingSpec = field(default_factory=MarkingSpec)
    seed: int = 0

    # ---- frames ---------------------------------------------------------------------------

    def to_local(self, gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx, dy = gx - self.origin[0], gy - self.origin[1]
        return c * dx + s * dy, -s * dx + c * dy

    def to_global(self, lx: np.ndarray, ly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.theta), math.sin(self.theta)
        return c * lx - s * ly + self.origin[0], s * lx + c * ly + self.origin[1]

    # ---- analytic classification ------------------------------------------------------------

    def classify(self, gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ground class id and paint code (PAINT_*) of global points (any equal shapes).

        Crosswalks are labelled as a whole (the ped_crossing polygon); only their stripes are painted.
        """
        x, y = self.to_local(np.asarray(gx, np.float64), np.asarray(gy, np.float64))
        return self.classify_local(x, y)

    def classify_local(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`classify` for points already in the local world frame."""
        shape = x.shape
        x, y = x.ravel(), y.ravel()
        cols, rows, mk = self.cols, self.rows, self.mk
        j, i, dx, dy, d_col, d_row, box = self._road_parts(x, y)
        inside = (x >= 0) & (x <= self.size[0]) & (y >= 0) & (y <= self.size[1])
        in_col, in_row = (d_col < 0) & inside, ((d_row < 0) | box) & inside
        box &= inside
        on_road = in_col | in_row

        cls = np.full(x.shape, OTHER, np.uint8)
        paint = np.zeros(x.shape, np.uint8)

        # sidewalks outside both roads, then the road, then the curb band across the road edge
        side_w = (d_col < mk.curb_w + cols.sw[j]) | (d_row < mk.curb_w + rows.sw[i])
        cls[inside & ~on_road & side_w] = SIDEWALK
        cls[on_road] = ROAD
        road_ext = (d_col < 0) | (d_row < 0) | (np.abs(dx) < cols.hw[j]) & (np.abs(dy) < rows.hw[i])
        cls[self._curb(x, y, road_ext, dx, dy, j, i) & inside] = CURB

        # column street segments: along = y, lateral = -dx, crossing = row i
        e_row = np.abs(dy) - rows.hw[i]  # along-distance from the crossing's edge
        e_col = np.abs(dx) - cols.hw[j]
        m = in_col & ~in_row
        if m.any():
            s = np.where(dy[m] >= 0, 1, 0)
            self._street(cols, j[m], i[m], s, y[m], -dx[m], e_row[m], cls, paint, m)
        m = in_row & ~in_col & ~box
        if m.any():
            s = np.where(dx[m] >= 0, 1, 0)
            self._street(rows, i[m], j[m], s, x[m], dy[m], e_col[m], cls, paint, m)
        return cls.reshape(shape), paint.reshape(shape)

    def _road_parts(self, x: np.ndarray, y: np.ndarray):
        """Nearest street indices, offsets, signed edge distances (< 0: inside; inf: missing
        segment) and intersection-box membership, for roads extended past the world's border."""
        cols, rows = self.cols, self.rows
        j = _nearest(cols.c, x)
        i = _nearest(rows.c, y)
        dx = x - cols.c[j]
        dy = y - rows.c[i]
        # streets may have missing segments (T-junctions): a missing one is not there at all
        col_ok = cols.seg_exists[j, np.searchsorted(rows.c, y)]
        row_ok = rows.seg_exists[i, np.searchsorted(cols.c, x)]
        d_col = np.where(col_ok, np.abs(dx) - cols.hw[j], np.inf)  # < 0: inside the column road
        d_row = np.where(row_ok, np.abs(dy) - rows.hw[i], np.inf)
        # intersection boxes are road even where the crossing arm is missing
        box = (np.abs(dx) < cols.hw[j]) & (np.abs(dy) < rows.hw[i])
        return j, i, dx, dy, d_col, d_row, box

    def _on_road_ext(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Road membership with streets running on past the world's border (no edge there)."""
        _, _, _, _, d_col, d_row, box = self._road_parts(x, y)
        return (d_col < 0) | (d_row < 0) | box

    def _curb(self, x, y, road, dx, dy, j, i) -> np.ndarray:
        """The curb band: points whose road membership changes within ``curb_w / 2`` along
        local x or y (dilation minus erosion of the road by a cross of that radius), i.e. a band
        centred on the road edge.  ``road`` is the points' own (extended) road membership."""
        h = self.mk.curb_w / 2
        # every road edge lies on a street's edge line |dx| = hw or |dy| = hw (nearest street)
        near = (np.abs(np.abs(dx) - self.cols.hw[j]) <= h + 0.05) | (np.abs(np.abs(dy) - self.rows.hw[i]) <= h + 0.05)
        out = np.zeros(x.shape, bool)
        k = np.nonzero(near)[0]
        if k.size:
            xk, yk, rk = x[k], y[k], road[k]
            changed = np.zeros(k.size, bool)
            for ox, oy in ((h, 0.0), (-h, 0.0), (0.0, h), (0.0, -h)):
                changed |= self._on_road_ext(xk + ox, yk + oy) != rk
            out[k] = changed
        return out

    def _street(self, st: Streets, k, cross, s, along, lat, e, cls, paint, m) -> None:
        mk = self.mk
        out_cls = cls[m]
        out_paint = paint[m]
        w, n = st.w[k], st.n[k]
        alat = np.abs(lat)
        mark = e >= mk.mark_start
        # double yellow centre line
        yellow = mark & (alat >= mk.yellow_gap / 2) & (alat < mk.yellow_gap / 2 + mk.yellow_w)
        # white lane dividers between lanes of the same direction
        q = np.rint(alat / w)
        near = (q >= 1) & (q <= n - 1) & (np.abs(alat - q * w) < mk.line_w / 2)
        dashed = np.mod(along + st.phase[k], mk.dash_period) < mk.dash_len
        solid = st.full_solid[k] | (e < mk.mark_start + mk.solid_len)
        lane = mark & near & (solid | dashed)
        has_cw = st.has_cw[k, cross, s]
        cw = has_cw & (e >= mk.cw_gap) & (e < mk.cw_gap + mk.cw_len)
        stop0 = np.where(has_cw, mk.cw_gap + mk.cw_len + mk.stop_gap, mk.cw_gap)
        sign_s = 2 * s - 1  # which side of the crossing street
        incoming = lat * (-sign_s) * SIDE > 0
        stop = st.has_stop[k, cross, s] & incoming & (e >= stop0) & (e < stop0 + mk.stop_w)
        out_cls[lane] = LANE
        out_paint[lane] = PAINT_WHITE
        out_cls[yellow] = YELLOW
        out_paint[yellow] = PAINT_YELLOW
        out_cls[cw] = CROSSWALK
        stripe = cw & (np.mod(lat + 1000.0, 2 * mk.zebra_w) < mk.zebra_w)
        out_paint[stripe] = PAINT_WHITE
        out_cls[stop] = STOP
        out_paint[stop] = PAINT_WHITE
        cls[m] = out_cls
        paint[m] = out_paint

    # ---- helpers for routes -------------------------------------------------------------------

    def street(self, kind: str) -> Streets:
        return self.cols if kind == "col" else self.rows


def _nearest(centres: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (centres sorted ascending)."""
    mids = (centres[1:] + centres[:-1]) / 2
    return np.searchsorted(mids, v)


def token(*parts: object) -> str:
    """A deterministic 32-hex nuScenes-style token."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def make_world(seed: int, n_cols: int = 5, n_rows: int = 5) -> World:
    """A random street grid (deterministic for ``seed``)."""
    rng = np.random.default_rng([seed, 1001])
    margin = 25.0

    def streets(k: int, m: int) -> tuple[Streets, float]:
        gaps = rng.uniform(60.0, 90.0, size=k - 1)
        c = margin + 20.0 + np.concatenate([[0.0], np.cumsum(gaps)])
        extent = float(c[-1] + 20.0 + margin)
        n = rng.choice([1, 2, 2, 3], size=k).astype(np.int64)
        w = rng.uniform(3.0, 3.6, size=k)
        sw = rng.uniform(1.8, 3.5, size=k)
        phase = rng.uniform(0, 8.0, size=k)
        full_solid = rng.random(k) < 0.2
        wear = rng.uniform(0.0, 0.5, size=k)
        has_cw = rng.random((k, m, 2)) < 0.7
        has_stop = rng.random((k, m, 2)) < 0.85
        seg_exists = np.ones((k, m + 1), bool)
        return Streets(c, n, w, sw, phase, full_solid, wear, has_cw, has_stop, seg_exists), extent

    cols, wx = streets(n_cols, n_rows)
    rows, wy = streets(n_rows, n_cols)
    # T-junctions: drop a few segments between interior intersections, at most one arm each
    arms_removed: set[tuple[int, int]] = set()  # (row i, col j) intersections that lost an arm
    cands = [("col", j, m) for j in range(1, n_cols - 1) for m in range(2, n_rows - 1)]
    cands += [("row", i, m) for i in range(1, n_rows - 1) for m in range(2, n_cols - 1)]
    for idx in rng.permutation(len(cands)):
        kind, k, m = cands[idx]
        ends = [(m - 1, k), (m, k)] if kind == "col" else [(k, m - 1), (k, m)]
        if rng.random() < 0.4 and not any(e in arms_removed for e in ends):
            (cols if kind == "col" else rows).seg_exists[k, m] = False
            arms_removed.update(ends)
    theta = float(rng.uniform(math.radians(8), math.radians(40)))
    # rotate the local rectangle, then shift so the canvas starts at 0 with a margin
    corners = np.array([[0, 0], [wx, 0], [0, wy], [wx, wy]], np.float64)
    c, s = math.cos(theta), math.sin(theta)
    rot = corners @ np.array([[c, s], [-s, c]])
    pad = 20.0
    origin = (float(pad - rot[:, 0].min()), float(pad - rot[:, 1].min()))
    canvas = (float(rot[:, 0].max() - rot[:, 0].min() + 2 * pad), float(rot[:, 1].max() - rot[:, 1].min() + 2 * pad))
    return World(size=(wx, wy), theta=theta, origin=origin, canvas=canvas, cols=cols, rows=rows, seed=seed)


# --------------------------------------------------------------------------------------------
# Road layout in local coordinates (shared by the polygons and the map expansion)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A street piece between two crossings (or a crossing and the world edge)."""

    kind: str  # "col" (along local y) or "row" (along local x)
    k: int  # street index
    a0: float  # along-range start (local coordinate along the street)
    a1: float
    cross0: int | None  # crossing street index at a0 (None: world edge)
    cross1: int | None


def segments(world: World) -> list[Segment]:
    out: list[Segment] = []
    for kind, st, other, length in (
        ("col", world.cols, world.rows, world.size[1]),
        ("row", world.rows, world.cols, world.size[0]),
    ):
        for k in range(len(st.c)):
            edges = [(0.0, None)]
            for mi in range(len(other.c)):
                edges.append((float(other.c[mi] - other.hw[mi]), mi))
                edges.append((float(other.c[mi] + other.hw[mi]), mi))
            edges.append((length, None))
            for p in range(0, len(edges), 2):
                (a0, c0), (a1, c1) = edges[p], edges[p + 1]
                if st.seg_exists[k, p // 2]:
                    out.append(Segment(kind, k, a0, a1, c0, c1))
    return out


def street_rect(world: World, kind: str, k: int, a0: float, a1: float, l0: float, l1: float) -> np.ndarray:
    """Local rectangle (4, 2) for along in [a0, a1], lateral in [l0, l1] on a street, CCW."""
    pts_al = [(a0, l0), (a1, l0), (a1, l1), (a0, l1)]
    out = np.array([street_to_local(world, kind, k, a, l) for a, l in pts_al])
    return _ccw(out)


def street_to_local(world: World, kind: str, k: int, along: float, lat: float) -> tuple[float, float]:
    """(along, lateral) on street ``k`` -> local (x, y). Lateral is to the left of +along."""
    if kind == "col":
        return float(world.cols.c[k] - lat), float(along)
    return float(along), float(world.rows.c[k] + lat)


def _ccw(pts: np.ndarray) -> np.ndarray:
    area = 0.5 * np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1])
    return pts if area > 0 else pts[::-1]


def approach_marks(world: World, seg: Segment) -> list[dict]:
    """Crosswalk / stop-line / marking ranges (along coordinates) at each crossing end of a segment."""
    mk = world.mk
    st = world.street(seg.kind)
    out = []
    for end, cross in ((0, seg.cross0), (1, seg.cross1)):
        if cross is None:
            continue
        # end 0 is at a0 (the crossing lies at smaller along: s = +1); end 1 at a1 (s = -1)
        sgn = 1.0 if end == 0 else -1.0
        edge = seg.a0 if end == 0 else seg.a1
        s_idx = 1 if end == 0 else 0
        has_cw = bool(st.has_cw[seg.k, cross, s_idx])
        has_stop = bool(st.has_stop[seg.k, cross, s_idx])
        stop0 = mk.cw_gap + mk.cw_len + mk.stop_gap if has_cw else mk.cw_gap

        def rng_(e0: float, e1: float) -> tuple[float, float]:
            a, b = edge + sgn * e0, edge + sgn * e1
            return (min(a, b), max(a, b))

        out.append(
            dict(
                end=end,
                cross=cross,
                sgn=sgn,
                edge=edge,
                cw=rng_(mk.cw_gap, mk.cw_gap + mk.cw_len) if has_cw else None,
                stop=rng_(stop0, stop0 + mk.stop_w) if has_stop else None,
                # incoming lanes: lateral sign = -s * SIDE, s = sgn
                incoming_sign=-sgn * SIDE,
                solid=rng_(mk.mark_start, mk.mark_start + mk.solid_len),
            )
        )
    return out


def marking_range(world: World, seg: Segment) -> tuple[float, float]:
    mk = world.mk
    a0 = seg.a0 + (mk.mark_start if seg.cross0 is not None else 0.0)
    a1 = seg.a1 - (mk.mark_start if seg.cross1 is not None else 0.0)
    return a0, a1
