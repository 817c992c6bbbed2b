"""The one module that talks to nuscenes-devkit's map-expansion API.

:func:`map_elements_in_box` returns, for one map (location) and a few layers, the shapely
geometries of every record whose bounds meet an axis-aligned box, in **global** coordinates
(metres, the map frame of ``global_T_ego``). Line layers (``road_divider``, ``lane_divider``,
...) give ``LineString``; polygon layers (``ped_crossing``, ``stop_line``, ``road_segment``,
``lane``, ...) give ``Polygon`` (``drivable_area`` records may hold several).

Loading a map JSON takes seconds on real nuScenes, so each process keeps its maps
(:func:`get_map`) and, per layer, the extracted geometries with an STR-tree for box queries
(:class:`LayerIndex`). Nothing of the devkit leaks out: callers see shapely objects only.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from bevctl.errors import BevctlError

if TYPE_CHECKING:
    from nuscenes.map_expansion.map_api import NuScenesMap

log = logging.getLogger(__name__)

LINE_LAYERS: tuple[str, ...] = ("road_divider", "lane_divider", "traffic_light")
POLYGON_LAYERS: tuple[str, ...] = (
    "drivable_area", "road_segment", "road_block", "lane", "ped_crossing", "walkway",
    "stop_line", "carpark_area", "lane_connector",
)
KNOWN_LOCATIONS: tuple[str, ...] = (
    "singapore-onenorth", "singapore-hollandvillage", "singapore-queenstown", "boston-seaport",
)

# layer name -> list of geometries (global coordinates, metres)
MapElements = dict[str, list[BaseGeometry]]

_lock = threading.Lock()


MAP_VERSION = "1.3"  # the map expansion version the devkit (and bevctl) reads
_VERSION_RE = re.compile(rb'"version"\s*:\s*"([^"]*)"')


def map_json_path(dataroot: str | Path, location: str) -> Path:
    return Path(dataroot) / "maps" / "expansion" / f"{location}.json"


def check_map_file(path: Path) -> None:
    """Refuse a missing map expansion file or one of an older version, cheaply: the version is
    looked for in the first and last 64 KiB (where the top-level ``"version"`` key sits in the
    published files) without parsing hundreds of MB of JSON; no version there = the devkit checks."""
    if not path.is_file():
        raise BevctlError(f"map expansion not found: {path} (download the nuScenes map expansion v{MAP_VERSION})")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        f.seek(max(0, size - (1 << 16)))
        tail = f.read()
    found = _VERSION_RE.findall(head) + _VERSION_RE.findall(tail)
    version = found[0].decode(errors="replace") if found else None
    if version is not None and _version_tuple(version) < _version_tuple(MAP_VERSION):
        raise BevctlError(f"{path}: map expansion version {version} is too old, bevctl needs v{MAP_VERSION} "
                          "(download the current nuScenes map expansion)")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in text.split("."))


@lru_cache(maxsize=8)
def _load_map(dataroot: str, location: str) -> "NuScenesMap":
    from nuscenes.map_expansion.map_api import NuScenesMap  # noqa: PLC0415 - nuscenes-devkit: heavy (matplotlib, descartes); only when the devkit is used

    if location not in KNOWN_LOCATIONS:
        raise BevctlError(f"unknown map location '{location}' (known: {', '.join(KNOWN_LOCATIONS)})")
    path = map_json_path(dataroot, location)
    check_map_file(path)
    try:
        nusc_map = NuScenesMap(dataroot=dataroot, map_name=location)
    except KeyError as e:
        raise BevctlError(f"{path}: map expansion lacks layer or token {e}") from None
    except Exception as e:  # noqa: BLE001 - the devkit raises bare Exception for old versions
        if "outdated map version" in str(e):  # no "version" key: the devkit assumes 1.0
            raise BevctlError(f"{path}: map expansion has no version or one older than v{MAP_VERSION} "
                              "(download the current nuScenes map expansion)") from None
        raise BevctlError(f"{path}: cannot load map expansion ({type(e).__name__}: {e})") from None
    log.debug("loaded map %s", path)
    return nusc_map


def get_map(dataroot: str | Path, location: str) -> "NuScenesMap":
    """The devkit's ``NuScenesMap`` for ``location``, loaded once per process."""
    with _lock:
        return _load_map(str(Path(dataroot).resolve()), location)


@dataclass
class LayerIndex:
    """One layer's geometries (global coordinates) and an STR-tree over them."""

    layer: str
    geoms: np.ndarray  # (M,) object array of shapely geometries
    tree: shapely.STRtree

    def query_box(self, box: tuple[float, float, float, float]) -> list[BaseGeometry]:
        """Geometries whose bounding box meets ``box`` = (x_min, y_min, x_max, y_max)."""
        if len(self.geoms) == 0:
            return []
        hits = self.tree.query(shapely.box(*box))
        return list(self.geoms[np.sort(hits)])


def _extract_layer(nusc_map: "NuScenesMap", layer: str) -> np.ndarray:
    records = getattr(nusc_map, layer, None)
    if records is None or not isinstance(records, list):
        raise BevctlError(f"{nusc_map.json_fname}: unknown map layer '{layer}'")
    explorer = nusc_map.explorer
    geoms: list[BaseGeometry] = []
    for rec in records:
        try:
            if "line_token" in rec:
                line = explorer.extract_line(rec["line_token"])
                if len(line.coords) >= 2:
                    geoms.append(line)
            else:
                tokens = rec.get("polygon_tokens") or [rec["polygon_token"]]
                for token in tokens:
                    poly = explorer.extract_polygon(token)
                    if not poly.is_empty and poly.area > 0:
                        geoms.append(poly)
        except KeyError as e:
            raise BevctlError(
                f"{nusc_map.json_fname}: {layer} record {rec.get('token', '?')} refers to missing {e}"
            ) from None
    return np.array(geoms, dtype=object)


@lru_cache(maxsize=64)
def _layer_index(dataroot: str, location: str, layer: str) -> LayerIndex:
    geoms = _extract_layer(_load_map(dataroot, location), layer)
    return LayerIndex(layer=layer, geoms=geoms, tree=shapely.STRtree(geoms))


def layer_index(dataroot: str | Path, location: str, layer: str) -> LayerIndex:
    """The cached geometries + STR-tree of one layer of one map (per process)."""
    with _lock:
        return _layer_index(str(Path(dataroot).resolve()), location, layer)


def map_elements_in_box(
    dataroot: str | Path,
    location: str,
    layers: tuple[str, ...] | list[str],
    box: tuple[float, float, float, float],
) -> MapElements:
    """Every record of ``layers`` whose bounds meet ``box`` (global x_min, y_min, x_max, y_max),
    as shapely geometries in global coordinates: ``{layer: [geometry, ...]}``."""
    return {layer: layer_index(dataroot, location, layer).query_box(box) for layer in layers}


def clear_caches() -> None:
    """Forget every loaded map (tests; a long-lived process switching datasets)."""
    with _lock:
        _layer_index.cache_clear()
        _load_map.cache_clear()
