"""Label maps: from a labeler's own class names to the BEV classes of a :class:`BEVClassSet`.

The pseudo-label store keeps the labeler's raw class ids and its ``id2label``; this module turns
them into BEV ids at training time, so a new mapping never needs a relabel.

A label map is data (YAML under ``bevctl/configs/label_maps/``)::

    name: synth
    warning: null                      # optional: logged whenever the map is used
    classes:
      road: background                 # ground without a marking
      sky: ignore                      # not on the ground plane
      crosswalk: ped_crossing          # a BEV class
      lane_marking: [lane_divider, divider]   # preferences: the first one the class set has

Shipped maps: Mapillary Vistas v1.2 and v2.0, Cityscapes (warns: no marking classes) and the
synthetic world's classes. The map is chosen by matching the labeler's class names
(case-insensitive); a labeler no shipped map covers needs a user file (same format; an optional
``base: <shipped map name>`` key starts from a shipped map and overrides some classes).
A class without a mapping is an error naming the class, never a silent background.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bevctl.config import BEVClassSet, load_yaml
from bevctl.errors import BevctlError

log = logging.getLogger(__name__)

BACKGROUND = "background"
IGNORE = "ignore"
IGNORE_ID = 255
# Shipped maps in the order they are tried when several cover a labeler's classes.
SHIPPED_MAP_FILES = (
    "synth.yaml",
    "cityscapes.yaml",
    "mapillary_vistas_v1.2.yaml",
    "mapillary_vistas_v2.0.yaml",
)


def normalize_name(name: str) -> str:
    """Class names match case-insensitively and ignoring repeated spaces."""
    return " ".join(str(name).split()).casefold()


@dataclass(frozen=True)
class LabelMap:
    """``classes``: normalised labeler class name -> BEV targets in order of preference."""

    name: str
    classes: dict[str, tuple[str, ...]]
    warning: str | None = None
    source: str = ""
    builtin: bool = False  # shipped with bevctl (bevctl/configs/label_maps)

    def targets(self, class_name: str) -> tuple[str, ...] | None:
        return self.classes.get(normalize_name(class_name))

    def covers(self, names: list[str]) -> bool:
        return all(normalize_name(n) in self.classes for n in names)


def _parse_targets(value: Any, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) and t for t in items):
        raise BevctlError(f"{where}: expected a class name or a non-empty list of class names, got {value!r}")
    return tuple(items)


def label_map_from_dict(data: dict[str, Any], source: str, base: LabelMap | None = None) -> LabelMap:
    """Validate a label-map mapping (as read from YAML)."""
    allowed = {"name", "warning", "classes", "base", "description"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BevctlError(f"{source}: unknown key(s) {unknown} (allowed: {sorted(allowed)})")
    raw = data.get("classes")
    if not isinstance(raw, dict) or not raw:
        raise BevctlError(f"{source}: 'classes' must be a non-empty mapping of class name -> BEV class")
    classes: dict[str, tuple[str, ...]] = dict(base.classes) if base is not None else {}
    seen: dict[str, str] = {}
    for key, value in raw.items():
        norm = normalize_name(str(key))
        if norm in seen:
            raise BevctlError(f"{source}: class '{key}' is listed twice (as '{seen[norm]}')")
        seen[norm] = str(key)
        classes[norm] = _parse_targets(value, f"{source}: classes.{key}")
    warning = data.get("warning")
    if warning is not None and not isinstance(warning, str):
        raise BevctlError(f"{source}: 'warning' must be a string")
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str):
        raise BevctlError(f"{source}: 'name' must be a string")
    if base is not None and warning is None:
        warning = base.warning
    return LabelMap(name=name, classes=classes, warning=warning, source=source)


@functools.cache
def shipped_label_maps() -> dict[str, LabelMap]:
    """The label maps shipped in ``bevctl/configs/label_maps``, by name."""
    root = importlib.resources.files("bevctl") / "configs" / "label_maps"
    maps: dict[str, LabelMap] = {}
    for fname in SHIPPED_MAP_FILES:
        res = root / fname
        try:
            data = yaml.safe_load(res.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise BevctlError(f"shipped label map {fname} is unreadable ({e}); reinstall bevctl") from None
        lm = label_map_from_dict(data, source=f"bevctl/configs/label_maps/{fname}")
        maps[lm.name] = dataclasses.replace(lm, builtin=True)
    return maps


def load_label_map_file(path: str | Path) -> LabelMap:
    """A user label map YAML (optionally ``base: <shipped map>`` to override a shipped one)."""
    data = load_yaml(path)
    base = None
    if "base" in data:
        shipped = shipped_label_maps()
        if data["base"] not in shipped:
            raise BevctlError(f"{path}: unknown base label map {data['base']!r} (known: {', '.join(shipped)})")
        base = shipped[data["base"]]
    return label_map_from_dict(data, source=str(path), base=base)


def select_label_map(id2label: dict[int, str], user_map_path: str | Path | None = None) -> LabelMap:
    """The user's map if given, else the first shipped map that names every labeler class."""
    names = [id2label[k] for k in sorted(id2label)]
    if user_map_path is not None:
        return load_label_map_file(user_map_path)
    shipped = shipped_label_maps()
    for lm in shipped.values():
        if lm.covers(names):
            return lm
    best = max(shipped.values(), key=lambda m: sum(normalize_name(n) in m.classes for n in names))
    missing = [n for n in names if normalize_name(n) not in best.classes]
    shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise BevctlError(
        f"no shipped label map knows this labeler's classes (nearest: '{best.name}', which lacks {shown}); "
        "pass a label map YAML file mapping every class name to a BEV class, background or ignore"
    )


def resolve_target(targets: tuple[str, ...], class_set: BEVClassSet) -> int:
    """The BEV id of the first target the class set has (0 background, k+1 class k, 255 ignore)."""
    for t in targets:
        if t == BACKGROUND:
            return 0
        if t == IGNORE:
            return IGNORE_ID
        if t in class_set.classes:
            return class_set.classes.index(t) + 1
    return -1


def resolve_label_map(
    id2label: dict[int, str], class_set: BEVClassSet, user_map_path: str | Path | None = None
) -> np.ndarray:
    """LUT ``uint8[256]``: labeler class id -> BEV id (0 background, k+1 class k, 255 ignore).

    Ids the labeler does not have map to 255 (ignore). Raises :class:`BevctlError` naming the
    first class that has no mapping, or whose targets are all missing from ``class_set``.
    """
    return resolve_label_map_record(id2label, class_set, user_map_path)[0]


def resolve_label_map_record(
    id2label: dict[int, str], class_set: BEVClassSet, user_map_path: str | Path | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """The LUT of :func:`resolve_label_map` and what it resolved, for a run's provenance:
    ``{"name", "source": the YAML file or "built in", "table": {labeler class: BEV class}}``
    (BEV class ``background``, ``ignore`` or a class of ``class_set``)."""
    lm = select_label_map(id2label, user_map_path)
    if lm.warning:
        log.warning("label map '%s': %s", lm.name, " ".join(lm.warning.split()))
    lut = np.full(256, IGNORE_ID, dtype=np.uint8)
    for cid in sorted(id2label):
        name = id2label[cid]
        if not (isinstance(cid, (int, np.integer)) and 0 <= int(cid) < IGNORE_ID):
            raise BevctlError(f"labeler class id {cid!r} ('{name}') is outside 0..254")
        targets = lm.targets(name)
        if targets is None:
            raise BevctlError(
                f"label map '{lm.name}' ({lm.source}) has no entry for labeler class '{name}' (id {cid}); "
                "map it to a BEV class, background or ignore"
            )
        bev = resolve_target(targets, class_set)
        if bev < 0:
            raise BevctlError(
                f"label map '{lm.name}': class '{name}' -> {list(targets)}, none of which is in class set "
                f"'{class_set.name}' ({', '.join(class_set.classes)}) nor background/ignore"
            )
        lut[int(cid)] = bev
    bev_names = {0: BACKGROUND, IGNORE_ID: IGNORE, **{k + 1: c for k, c in enumerate(class_set.classes)}}
    record = {"name": lm.name, "source": "built in" if lm.builtin else str(Path(lm.source).resolve()),
              "table": {id2label[cid]: bev_names[int(lut[int(cid)])] for cid in sorted(id2label)}}
    return lut, record


def apply_label_map(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Labeler ids (uint8, any shape) -> BEV ids through a LUT from :func:`resolve_label_map`."""
    return lut[labels]
