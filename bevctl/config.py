"""Dataclass configs: the BEV grid, class sets, and YAML loading with strict validation.

Everything here is plain data. Model presets and training configs live beside the code that
uses them (``bevctl.train``) but load through :func:`load_dataclass` so every config file gets
the same checks: unknown keys, wrong types and impossible values are one clear error line.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bevctl.errors import BevctlError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# BEV grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BEVGrid:
    """A regular grid on the ground plane of the ego frame (x forward, y left), in metres.

    BEV tensors are laid out ``(..., X, Y)``: index ``i`` runs along x from ``x_min``,
    index ``j`` along y from ``y_min``. Cell ``(i, j)`` covers
    ``[x_min + i*res, x_min + (i+1)*res) x [y_min + j*res, y_min + (j+1)*res)``; its centre is
    at ``x_min + (i + 0.5) * res``.
    """

    x_min: float
    x_max: float
    y_min: float
    y_max: float
    resolution: float

    def __post_init__(self) -> None:
        if not self.resolution > 0:
            raise BevctlError(f"BEV grid: resolution must be > 0, got {self.resolution}")
        if not (self.x_max > self.x_min and self.y_max > self.y_min):
            raise BevctlError(
                f"BEV grid: empty extent x=[{self.x_min}, {self.x_max}] y=[{self.y_min}, {self.y_max}]"
            )
        for name, extent in (("x", self.x_max - self.x_min), ("y", self.y_max - self.y_min)):
            cells = extent / self.resolution
            if abs(cells - round(cells)) > 1e-6:
                raise BevctlError(
                    f"BEV grid: {name} extent {extent} m is not a whole number of {self.resolution} m cells"
                )

    @property
    def nx(self) -> int:
        """Number of cells along x (forward)."""
        return int(round((self.x_max - self.x_min) / self.resolution))

    @property
    def ny(self) -> int:
        """Number of cells along y (left)."""
        return int(round((self.y_max - self.y_min) / self.resolution))

    @property
    def shape(self) -> tuple[int, int]:
        """``(X, Y)``."""
        return (self.nx, self.ny)

    def coarsened(self, factor: int) -> "BEVGrid":
        """The same extent with cells ``factor`` times larger (for coarse BEV queries)."""
        if self.nx % factor or self.ny % factor:
            raise BevctlError(f"BEV grid {self.shape} is not divisible by {factor}")
        return dataclasses.replace(self, resolution=self.resolution * factor)


GRID_PRESETS: dict[str, BEVGrid] = {
    # The grid of HDMapNet and of the public BEVFormer map-segmentation numbers: 400 x 200.
    "hdmapnet": BEVGrid(x_min=-30.0, x_max=30.0, y_min=-15.0, y_max=15.0, resolution=0.15),
    # Small enough for a laptop CPU: 128 x 64 cells of 0.25 m.
    "demo": BEVGrid(x_min=-16.0, x_max=16.0, y_min=-8.0, y_max=8.0, resolution=0.25),
}


def grid_from_name(name: str) -> BEVGrid:
    try:
        return GRID_PRESETS[name]
    except KeyError:
        raise BevctlError(f"unknown BEV grid '{name}' (known: {', '.join(GRID_PRESETS)}, or a YAML file)") from None


def is_yaml_path(spec: str) -> bool:
    """Whether a preset-or-file option names a YAML file (rather than a preset)."""
    return spec.endswith((".yaml", ".yml"))


def resolve_grid(spec: str) -> BEVGrid:
    """A grid preset name (``hdmapnet``, ``demo``) or a YAML file with :class:`BEVGrid` fields."""
    return load_dataclass(BEVGrid, spec) if is_yaml_path(spec) else grid_from_name(spec)


# --------------------------------------------------------------------------------------------
# BEV class sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BEVClassSet:
    """BEV classes as data. BEV maps are single-label: id 0 is background, class ``k`` (in
    ``classes``) has id ``k + 1``. Where map elements overlap, the class listed **later** wins
    (``classes`` is in increasing priority).

    ``layers`` tells the rasteriser which map-expansion layers make each class and how:
    ``{"divider": {"lines": ["road_divider", "lane_divider"]}, "ped_crossing": {"polygons":
    ["ped_crossing"]}, "boundary": {"outline": ["road_segment", "lane"]}}``.
    """

    name: str
    classes: tuple[str, ...]
    layers: dict[str, dict[str, tuple[str, ...]]]
    line_width_m: float = 0.3

    def __post_init__(self) -> None:
        if not self.classes:
            raise BevctlError(f"class set '{self.name}': empty class list")
        if len(set(self.classes)) != len(self.classes):
            raise BevctlError(f"class set '{self.name}': duplicate class names")
        missing = [c for c in self.classes if c not in self.layers]
        if missing:
            raise BevctlError(f"class set '{self.name}': no map layers given for {missing}")
        if not self.line_width_m > 0:
            raise BevctlError(f"class set '{self.name}': line_width_m must be > 0")

    @property
    def names_with_background(self) -> tuple[str, ...]:
        return ("background", *self.classes)

    @property
    def num_classes(self) -> int:
        """Number of output channels including background."""
        return len(self.classes) + 1


CLASS_SETS: dict[str, BEVClassSet] = {
    "hdmapnet": BEVClassSet(
        name="hdmapnet",
        classes=("boundary", "ped_crossing", "divider"),
        layers={
            "divider": {"lines": ("road_divider", "lane_divider")},
            "ped_crossing": {"polygons": ("ped_crossing",)},
            "boundary": {"outline": ("road_segment", "lane")},
        },
    ),
    "markings": BEVClassSet(
        name="markings",
        classes=("boundary", "ped_crossing", "stop_line", "road_divider", "lane_divider"),
        layers={
            "lane_divider": {"lines": ("lane_divider",)},
            "road_divider": {"lines": ("road_divider",)},
            "ped_crossing": {"polygons": ("ped_crossing",)},
            "stop_line": {"polygons": ("stop_line",)},
            "boundary": {"outline": ("road_segment", "lane")},
        },
    ),
}


def class_set_from_name(name: str) -> BEVClassSet:
    try:
        return CLASS_SETS[name]
    except KeyError:
        raise BevctlError(f"unknown class set '{name}' (known: {', '.join(CLASS_SETS)}, or a YAML file)") from None


def resolve_class_set(spec: str) -> BEVClassSet:
    """A class-set preset name (``hdmapnet``, ``markings``) or a YAML file with
    :class:`BEVClassSet` fields."""
    return load_dataclass(BEVClassSet, spec) if is_yaml_path(spec) else class_set_from_name(spec)


def parse_hw(text: str, option_name: str = "--image-size") -> tuple[int, int]:
    """``"225x400"`` -> ``(225, 400)`` (an option such as --image-size); BevctlError on anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m:
        raise BevctlError(f"{option_name} '{text}': expected HxW, e.g. 225x400")
    h, w = int(m.group(1)), int(m.group(2))
    if h <= 0 or w <= 0:
        raise BevctlError(f"{option_name} '{text}': height and width must be positive")
    return h, w


# --------------------------------------------------------------------------------------------
# YAML <-> dataclass, strictly
# --------------------------------------------------------------------------------------------


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _check_type(value, arg, where)
            except BevctlError as e:
                errors.append(str(e))
        raise BevctlError(f"{where}: {value!r} is not of type {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise BevctlError(f"{where}: expected null, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise BevctlError(f"{where}: expected a mapping, got {value!r}")
        return dataclass_from_dict(annotation, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise BevctlError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise BevctlError(f"{where}: expected a mapping, got {value!r}")
        return {k: _check_type(v, args[1], f"{where}.{k}") if args else v for k, v in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BevctlError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BevctlError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise BevctlError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise BevctlError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def dataclass_from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BevctlError(f"{where}: unknown key(s) {unknown} (allowed: {sorted(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise BevctlError(f"{where}: {e}") from None


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(obj)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BevctlError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BevctlError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BevctlError(f"{path}: expected a mapping at the top level")
    return data


def load_dataclass(cls: type[T], path: str | Path) -> T:
    """Load a YAML file into dataclass ``cls`` (strict)."""
    return dataclass_from_dict(cls, load_yaml(path), where=str(path))
