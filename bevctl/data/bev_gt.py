"""BEV ground truth: nuScenes map-expansion layers rasterised in a sample's ego frame.

Rules (also in docs/bev_gt.md):

- Frame: a map point (x, y, 0) in global coordinates is mapped by ``ego_T_global`` and its ego
  ``(x, y)`` is kept (orthographic drop onto the ego ground plane z = 0).
- ``lines`` layers: each line is drawn as a band ``line_width_m`` wide (``width/2`` on either
  side, flat ends exactly at the line's end points, round joins).
- ``polygons`` layers: filled (holes stay empty).
- ``outline`` layers: the boundary of the union of those polygons (outer edges and the edges
  of holes, e.g. traffic islands) drawn as a band ``line_width_m`` wide. Gaps narrower than
  10 cm between the polygons are closed first (morphological closing by ``OUTLINE_SNAP_M``).
- A cell belongs to a shape iff its **centre** lies inside the drawn shape (sub-cell exact:
  no rounding of vertices). A centre exactly on an edge counts on the edge's low-``y`` side
  rule: inside if the edge is the shape's lower ``y`` boundary, outside if the upper one.
- Output is single-label uint8 ``(X, Y)``: 0 = background (no class covers the cell centre,
  including cells the map does not describe), class ``k`` of ``class_set.classes`` = ``k + 1``.
  Classes are painted in list order, so a **later class overwrites an earlier one**.

The fill is a vectorised scanline with the non-zero winding rule, written in numpy: polygons
are oriented (exteriors counter-clockwise, holes clockwise), every edge is intersected with
every cell-centre row it spans (half-open in x, so a vertex on a row counts once), and a
per-row cumulative sum of the signed crossings gives each centre's winding number; non-zero
means inside. Overlapping polygons of one class therefore form their union.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from bevctl.config import BEVClassSet, BEVGrid
from bevctl.data.nuscenes_map import MapElements, map_elements_in_box
from bevctl.data.records import SampleRecord
from bevctl.errors import BevctlError

RULE_KINDS = ("lines", "polygons", "outline")
# Gaps narrower than 2 * OUTLINE_SNAP_M between the polygons of an outline rule are closed.
OUTLINE_SNAP_M = 0.05


def required_layers(class_set: BEVClassSet) -> tuple[str, ...]:
    """Every map layer the class set draws from, in first-use order."""
    layers: list[str] = []
    for name in class_set.classes:
        for kind, names in class_set.layers[name].items():
            if kind not in RULE_KINDS:
                raise BevctlError(
                    f"class set '{class_set.name}': class '{name}' has unknown rule '{kind}' "
                    f"(allowed: {', '.join(RULE_KINDS)})"
                )
            layers.extend(n for n in names if n not in layers)
    return tuple(layers)


def grid_margin(grid: BEVGrid, class_set: BEVClassSet) -> float:
    """How far beyond the grid map geometry must be fetched (and clipped) so that clipping
    never creates or removes anything visible inside the grid."""
    return 2.0 * class_set.line_width_m + 2.0 * grid.resolution + 1.0


def grid_box_global(global_T_ego: np.ndarray, grid: BEVGrid, margin: float) -> tuple[float, float, float, float]:
    """Axis-aligned global box (x_min, y_min, x_max, y_max) around the grid plus ``margin``."""
    xs = [grid.x_min - margin, grid.x_max + margin]
    ys = [grid.y_min - margin, grid.y_max + margin]
    corners = np.array([[x, y, 0.0, 1.0] for x in xs for y in ys]).T  # (4, 4)
    g = np.asarray(global_T_ego, dtype=np.float64) @ corners
    return float(g[0].min()), float(g[1].min()), float(g[0].max()), float(g[1].max())


def cell_T_global(global_T_ego: np.ndarray, grid: BEVGrid) -> np.ndarray:
    """(3, 3) affine map from global ground (x, y, 1) to continuous cell-centre coordinates
    (u, v, 1): cell (i, j)'s centre is at (u, v) = (i, j)."""
    g = np.asarray(global_T_ego, dtype=np.float64)
    if g.shape != (4, 4) or not np.isfinite(g).all():
        raise BevctlError(f"global_T_ego must be a finite 4x4 matrix, got shape {g.shape}")
    ego_T_global = np.linalg.inv(g)
    # ego (x, y) of global (gx, gy, 0): rows 0, 1 of ego_T_global without the z column.
    ego_xy_T = ego_T_global[:2][:, [0, 1, 3]]  # (2, 3)
    res = grid.resolution
    cell_T_ego = np.array(
        [[1 / res, 0.0, -grid.x_min / res - 0.5], [0.0, 1 / res, -grid.y_min / res - 0.5]]
    )  # (2, 3) acting on (x, y, 1)
    out = np.eye(3)
    out[:2] = cell_T_ego @ np.vstack([ego_xy_T, [0.0, 0.0, 1.0]])
    return out


# ---- polygon fill ---------------------------------------------------------------------------


def _polygon_parts(geoms: Iterable[BaseGeometry]) -> list[shapely.Polygon]:
    parts: list[shapely.Polygon] = []
    for g in geoms:
        if g is None or g.is_empty:
            continue
        if isinstance(g, shapely.Polygon):
            parts.append(g)
        elif hasattr(g, "geoms"):
            parts.extend(_polygon_parts(g.geoms))
    return parts


def fill_polygons(polygons: Iterable[BaseGeometry], shape: tuple[int, int], cell_T: np.ndarray) -> np.ndarray:
    """Bool mask (X, Y): cells whose centre is inside the union of ``polygons`` (non-zero
    winding). ``cell_T`` (3, 3) maps polygon coordinates to cell-centre coordinates (u, v)."""
    nx, ny = shape
    parts = _polygon_parts(polygons)
    if not parts:
        return np.zeros(shape, dtype=bool)
    oriented = shapely.orient_polygons(np.array(parts, dtype=object), exterior_cw=False)
    rings = shapely.get_rings(oriented)  # exteriors CCW, holes CW
    coords, ring_idx = shapely.get_coordinates(rings, return_index=True)  # (P, 2), (P,)
    # Each ring is closed (last == first); edges join consecutive points of the same ring.
    same = ring_idx[1:] == ring_idx[:-1]
    uv = coords @ cell_T[:2, :2].T + cell_T[:2, 2]  # (P, 2)
    u0, v0 = uv[:-1][same, 0], uv[:-1][same, 1]
    u1, v1 = uv[1:][same, 0], uv[1:][same, 1]
    # Rows i (cell-centre u = i) crossed by an edge: i in [min(u0,u1), max(u0,u1)).
    lo = np.minimum(u0, u1)
    hi = np.maximum(u0, u1)
    r0 = np.clip(np.ceil(lo), 0, nx).astype(np.int64)
    r1 = np.clip(np.ceil(hi), 0, nx).astype(np.int64)
    counts = np.maximum(r1 - r0, 0)
    keep = counts > 0
    if not keep.any():
        return np.zeros(shape, dtype=bool)
    u0, v0, u1, v1, r0, counts = u0[keep], v0[keep], u1[keep], v1[keep], r0[keep], counts[keep]
    edge = np.repeat(np.arange(len(counts)), counts)
    offsets = np.arange(edge.size) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = r0[edge] + offsets
    t = (rows - u0[edge]) / (u1[edge] - u0[edge])
    v = v0[edge] + t * (v1[edge] - v0[edge])
    sign = np.where(u1[edge] > u0[edge], 1, -1).astype(np.int32)
    # Centres with j >= v are on the far side of this crossing.
    start = np.clip(np.ceil(v), 0, ny).astype(np.int64)
    winding = np.zeros((nx, ny + 1), dtype=np.int32)
    np.add.at(winding, (rows, start), sign)
    return np.cumsum(winding[:, :ny], axis=1) != 0


# ---- per-rule shapes ------------------------------------------------------------------------


def _bands(lines: list[BaseGeometry], width: float) -> list[BaseGeometry]:
    """Lines -> polygons ``width`` wide (flat ends, round joins)."""
    lines = [g for g in lines if g is not None and not g.is_empty]
    if not lines:
        return []
    out = shapely.buffer(np.array(lines, dtype=object), width / 2.0, quad_segs=4,
                         cap_style="flat", join_style="round")
    return [g for g in out if not g.is_empty]


def _outline(polygons: list[BaseGeometry], clip: BaseGeometry) -> BaseGeometry | None:
    """Boundary of the union of ``polygons`` (clipped to ``clip``, which must reach far enough
    beyond the grid for the cut edges to stay invisible)."""
    parts = _polygon_parts(polygons)
    if not parts:
        return None
    arr = np.array(parts, dtype=object)
    invalid = ~shapely.is_valid(arr)
    if invalid.any():
        arr[invalid] = shapely.make_valid(arr[invalid])
    # Morphological closing by OUTLINE_SNAP_M: adjacent map polygons rarely share exact vertices
    # (rounding, separately drawn records), and a hairline gap between them would otherwise
    # outline a spurious boundary across the road.
    grown = shapely.buffer(shapely.intersection(arr, clip), OUTLINE_SNAP_M, join_style="mitre")
    union = shapely.buffer(shapely.union_all(grown), -OUTLINE_SNAP_M, join_style="mitre")
    if union.is_empty:
        return None
    return union.boundary


def class_shapes(
    map_elements: MapElements, class_name: str, class_set: BEVClassSet, clip: BaseGeometry
) -> list[BaseGeometry]:
    """The polygons drawn for one class, in the coordinates of ``map_elements``."""
    rules = class_set.layers[class_name]
    width = class_set.line_width_m
    shapes: list[BaseGeometry] = []
    for kind, layers in rules.items():
        geoms = [g for layer in layers for g in map_elements.get(layer, [])]
        if kind == "lines":
            shapes.extend(_bands([shapely.intersection(g, clip) for g in geoms], width))
        elif kind == "polygons":
            shapes.extend(geoms)
        elif kind == "outline":
            boundary = _outline(geoms, clip)
            if boundary is not None:
                shapes.extend(_bands([boundary], width))
        else:
            raise BevctlError(f"class set '{class_set.name}': class '{class_name}' has unknown rule '{kind}'")
    return shapes


# ---- public API -----------------------------------------------------------------------------


def rasterize_sample(
    map_elements: MapElements, global_T_ego: np.ndarray, grid: BEVGrid, class_set: BEVClassSet
) -> np.ndarray:
    """Single-label BEV ground truth uint8 (X, Y) of ``map_elements`` (``{layer: [shapely
    geometry in global coordinates]}``) seen from ego pose ``global_T_ego`` (4, 4)."""
    if class_set.num_classes > 255:
        raise BevctlError(f"class set '{class_set.name}': too many classes for uint8")
    cell_T = cell_T_global(global_T_ego, grid)
    margin = grid_margin(grid, class_set)
    clip = shapely.box(*grid_box_global(global_T_ego, grid, margin))
    out = np.zeros(grid.shape, dtype=np.uint8)  # (X, Y)
    for k, name in enumerate(class_set.classes):
        shapes = class_shapes(map_elements, name, class_set, clip)
        if shapes:
            out[fill_polygons(shapes, grid.shape, cell_T)] = k + 1
    return out


def map_elements_for_sample(
    dataroot: str | Path, sample: SampleRecord, grid: BEVGrid, class_set: BEVClassSet
) -> MapElements:
    """The map geometries around one sample that its BEV ground truth can see."""
    box = grid_box_global(sample.global_T_ego, grid, grid_margin(grid, class_set))
    return map_elements_in_box(dataroot, sample.location, required_layers(class_set), box)


def bev_gt_for_sample(
    dataroot: str | Path, sample: SampleRecord, grid: BEVGrid, class_set: BEVClassSet
) -> np.ndarray:
    """BEV ground truth uint8 (X, Y) of one sample (maps cached per process)."""
    elements = map_elements_for_sample(dataroot, sample, grid, class_set)
    return rasterize_sample(elements, sample.global_T_ego, grid, class_set)
