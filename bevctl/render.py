"""Every figure bevctl draws: BEV maps, error views, camera grids, animation frames.

One place for the look, so ``visualize``, the demo report and the scene animation agree:

- class colours: :data:`PALETTE` (row 0 = background), 255 (ignore / no data) is black;
- a BEV panel is drawn x (forward) up and y (left) to the left, in metres on both axes, the ego
  vehicle as a white box with its heading triangle at the origin;
- an error panel colours every cell by how the prediction relates to the ground truth:
  correct class (TP), a class where the GT has background (FP), background where the GT has a
  class (FN), another class than the GT's (wrong class), both background (TN); its caption lists
  TP / FP / FN and IoU per class;
- each figure carries a class legend whose patch colours are exactly :data:`PALETTE`'s.

Figures are plain :class:`matplotlib.figure.Figure` objects on the Agg canvas (no pyplot, no
global state): :func:`save_png` writes one atomically, :func:`figure_rgb` rasterises one for an
animation frame.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Polygon, Rectangle

from bevctl.config import BEVGrid
from bevctl.io import atomic_write_bytes

PALETTE = np.array([
    [40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
], dtype=np.uint8)  # fmt: skip
IGNORE_RGB = np.array([0, 0, 0], dtype=np.uint8)

# error categories of :func:`error_map` and their colours
TN, TP, FP, FN, WRONG = 0, 1, 2, 3, 4
ERROR_NAMES = ("TN (both background)", "TP (right class)", "FP (class on background)",
               "FN (missed class)", "wrong class")
ERROR_RGB = np.array([[40, 40, 40], [60, 200, 90], [235, 60, 60], [60, 130, 255], [250, 170, 40]], dtype=np.uint8)

DPI = 100
EGO_LENGTH_M, EGO_WIDTH_M, EGO_REAR_M = 4.6, 1.9, 1.0  # box around the ego origin (rear axle)


def house_style(fn: Callable) -> Callable:
    """Draw with matplotlib's default style whatever an imported library changed globally
    (nuscenes-devkit's map API switches to a grid style on import)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.style.context("default"):
            return fn(*args, **kwargs)

    return wrapper


def class_rgb(num_classes: int) -> np.ndarray:
    """(C, 3) uint8: the colour of every class id, background first."""
    return PALETTE[np.arange(num_classes) % len(PALETTE)]


def colorize(ids: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Class ids ``(...)`` -> RGB ``(..., 3)`` uint8; 255 (ignore / no prediction) is black."""
    ids = np.asarray(ids)
    out = PALETTE[ids.astype(np.int64) % len(PALETTE)].copy()
    out[ids == 255] = IGNORE_RGB
    return out


def bev_image(ids: np.ndarray) -> np.ndarray:
    """``(X, Y)`` -> the displayed orientation ``(X, Y)`` with row 0 = front, column 0 = left."""
    return np.asarray(ids)[::-1, ::-1]


def bev_extent(grid: BEVGrid) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) in metres for :func:`bev_image` arrays."""
    return (grid.y_max, grid.y_min, grid.x_min, grid.x_max)


def error_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """uint8 error category per cell (TN, TP, FP, FN, WRONG); GT 255 (ignore) stays 255."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    out = np.full(gt.shape, TN, np.uint8)
    out[(pred == gt) & (gt > 0)] = TP
    out[(pred > 0) & (gt == 0)] = FP
    out[(pred == 0) & (gt > 0)] = FN
    out[(pred > 0) & (gt > 0) & (pred != gt)] = WRONG
    out[gt == 255] = 255
    return out


def class_counts(pred: np.ndarray, gt: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Per class (background excluded): TP, FP, FN cells and IoU (None when absent from both)."""
    valid = np.asarray(gt) != 255
    out: dict[str, dict[str, float | None]] = {}
    for k, name in enumerate(names):
        if k == 0:
            continue
        p, g = (pred == k) & valid, (gt == k) & valid
        tp, fp, fn = int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum())
        union = tp + fp + fn
        out[name] = {"tp": tp, "fp": fp, "fn": fn, "iou": tp / union if union else None}
    return out


def miou(counts: dict[str, dict[str, float | None]]) -> float | None:
    ious = [c["iou"] for c in counts.values() if c["iou"] is not None]
    return float(np.mean(ious)) if ious else None


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


# ---- panels -----------------------------------------------------------------------------------


def draw_ego(ax, color: str = "white") -> None:
    """The ego vehicle at the origin of a BEV panel (axes: y horizontal, x vertical)."""
    ax.add_patch(Rectangle((-EGO_WIDTH_M / 2, -EGO_REAR_M), EGO_WIDTH_M, EGO_LENGTH_M, fill=False,
                           edgecolor=color, linewidth=1.2, zorder=3))
    nose = EGO_LENGTH_M - EGO_REAR_M
    ax.add_patch(Polygon([(-EGO_WIDTH_M / 2, nose - 1.2), (EGO_WIDTH_M / 2, nose - 1.2), (0.0, nose)],
                         closed=True, color=color, zorder=3))


def bev_panel(ax, rgb: np.ndarray, grid: BEVGrid, title: str, *, axis_labels: bool = True) -> None:
    """One BEV map (``rgb`` in :func:`bev_image` orientation) with metric axes and the ego."""
    ax.imshow(rgb, extent=bev_extent(grid), interpolation="nearest", origin="upper")
    ax.set_title(title, fontsize=9)
    draw_ego(ax)
    ax.tick_params(labelsize=7)
    if axis_labels:
        ax.set_xlabel("y (m, left +)", fontsize=8)
        ax.set_ylabel("x (m, forward +)", fontsize=8)


def message_panel(ax, text: str) -> None:
    """A panel that says why it is empty (instead of a silent black image)."""
    ax.set_facecolor((0.93, 0.93, 0.93))
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def class_legend_handles(names: Sequence[str]) -> list[Patch]:
    """One patch per class with exactly its :data:`PALETTE` colour."""
    rgb = class_rgb(len(names))
    return [Patch(facecolor=tuple(rgb[k] / 255.0), edgecolor="black", label=name) for k, name in enumerate(names)]


def error_legend_handles() -> list[Patch]:
    return [Patch(facecolor=tuple(ERROR_RGB[k] / 255.0), edgecolor="black", label=ERROR_NAMES[k])
            for k in (TP, FP, FN, WRONG, TN)]


@dataclass(frozen=True)
class BevMap:
    """One BEV panel to draw: class ids ``(X, Y)`` (255 = no data) under ``title``; with ``gt``
    an error panel comparing them is drawn under it."""

    title: str
    ids: np.ndarray
    gt: np.ndarray | None = None


def _errors_caption(counts: dict[str, dict[str, float | None]]) -> str:
    lines = [f"{name}: IoU {pct(c['iou'])}" for name, c in counts.items()]
    return "\n".join(lines)


def error_panel(ax, m: BevMap, grid: BEVGrid, class_names: Sequence[str], axis_labels: bool = False) -> None:
    """The error view of ``m`` against ``m.gt`` with per-class IoU in a caption."""
    assert m.gt is not None
    err = bev_image(error_map(m.ids, m.gt))
    rgb = ERROR_RGB[np.minimum(err, len(ERROR_RGB) - 1)]
    rgb[err == 255] = IGNORE_RGB
    counts = class_counts(np.asarray(m.ids), np.asarray(m.gt), class_names)
    bev_panel(ax, rgb, grid, f"errors of {m.title}\nmIoU {pct(miou(counts))}", axis_labels=axis_labels)
    ax.text(0.03, 0.02, _errors_caption(counts), transform=ax.transAxes, fontsize=6.5, color="white",
            va="bottom", ha="left", bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "linewidth": 0})


LEGEND_ROW_IN = 0.3


def legend_height_in(errors: bool) -> float:
    """Height (inches) that :func:`add_legends` takes at the bottom of a figure."""
    return LEGEND_ROW_IN * (3.3 if errors else 1.2)


def add_legends(fig: Figure, class_names: Sequence[str], errors: bool) -> None:
    """The class legend (and above it the error legend) along the bottom of ``fig``."""
    row_in = LEGEND_ROW_IN
    no_data = Patch(facecolor=tuple(IGNORE_RGB / 255.0), edgecolor="gray", label="no data / ignore")
    fig.legend(handles=[*class_legend_handles(class_names), no_data], loc="lower center", ncol=len(class_names) + 1,
               fontsize=7,
               frameon=False, bbox_to_anchor=(0.5, 0.0), handlelength=1.5, columnspacing=1.0)
    if errors:
        fig.legend(handles=error_legend_handles(), loc="lower center", ncol=3, fontsize=7, frameon=False,
                   bbox_to_anchor=(0.5, row_in / fig.get_figheight()), handlelength=1.5, columnspacing=1.0)


@house_style
def bev_figure(maps: Sequence[BevMap], grid: BEVGrid, class_names: Sequence[str], title: str = "",
               panel_width_in: float = 2.0) -> Figure:
    """Panels in one row, each with its title, metric axes and the ego; right of every map that
    has a ``gt``, its error view with per-class IoU; the class legend (and the error legend)
    along the bottom."""
    columns = sum(2 if m.gt is not None else 1 for m in maps)
    errors = any(m.gt is not None for m in maps)
    panel_h = panel_width_in * (grid.x_max - grid.x_min) / (grid.y_max - grid.y_min)
    left, right, gap = 0.6, 0.15, 0.45  # inches
    legend_in = legend_height_in(errors)
    top_in = (0.45 if title else 0.1) + 0.45  # suptitle, panel titles (two lines on error panels)
    bottom_in = legend_in + 0.5  # axis labels
    width = left + columns * panel_width_in + (columns - 1) * gap + right
    height = top_in + panel_h + bottom_in
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, columns, squeeze=False)[0]
    col = 0
    for m in maps:
        bev_panel(axes[col], colorize(bev_image(m.ids)), grid, m.title, axis_labels=col == 0)
        col += 1
        if m.gt is not None:
            error_panel(axes[col], m, grid, class_names)
            col += 1
    if title:
        fig.suptitle(title, fontsize=10)
    add_legends(fig, class_names, errors)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top_in / height,
                        bottom=bottom_in / height, wspace=gap / panel_width_in)
    return fig


@dataclass(frozen=True)
class CameraColumn:
    """One column of :func:`cameras_figure`: a title and one RGB image per camera, or, when
    ``images`` is None, a ``message`` saying why the column is empty."""

    title: str
    images: Sequence[np.ndarray] | None
    message: str = ""


@house_style
def cameras_figure(columns: Sequence[CameraColumn], cameras: Sequence[str], class_names: Sequence[str],
                   title: str = "", image_width_in: float = 2.4) -> Figure:
    """A camera per row (its name on the left), a column per view (its title on top), a class legend."""
    first = next(c.images[0] for c in columns if c.images is not None)
    h, w = first.shape[:2]
    img_h = image_width_in * h / w
    fig = Figure(figsize=(image_width_in * len(columns) + 0.45, img_h * len(cameras) + legend_height_in(False) + 0.5
                          + (0.3 if title else 0)),
                 dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(cameras), len(columns), squeeze=False)
    for r, cam in enumerate(cameras):
        for c, col in enumerate(columns):
            ax = axes[r][c]
            if col.images is None:
                message_panel(ax, col.message if r == 0 else "")
            else:
                ax.imshow(col.images[r], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            if r == 0:
                ax.set_title(col.title, fontsize=9)
            if c == 0:
                ax.set_ylabel(cam.replace("CAM_", ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    add_legends(fig, class_names, errors=False)
    fig.subplots_adjust(left=0.35 / fig.get_figwidth(), right=0.99, bottom=(legend_height_in(False) + 0.1) / fig.get_figheight(),
                        top=1 - (0.6 if title else 0.3) / fig.get_figheight(), wspace=0.03, hspace=0.05)
    return fig


def overlay(image: np.ndarray, ids: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with class ids (H, W) blended in where they are not background
    and not 255."""
    out = image.copy()
    hit = (ids != 255) & (ids != 0)
    out[hit] = ((1 - alpha) * image[hit] + alpha * colorize(ids)[hit]).astype(np.uint8)
    return out


# ---- output -----------------------------------------------------------------------------------


@house_style
def figure_rgb(fig: Figure) -> np.ndarray:
    """The figure rasterised: uint8 ``(H, W, 3)``."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


@house_style
def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically (temp file + rename); returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


@house_style
def scene_frame(cameras: Sequence[tuple[str, np.ndarray]], maps: Sequence[BevMap], grid: BEVGrid,
                class_names: Sequence[str], title: str = "", camera_width_in: float = 2.0,
                panel_height_in: float = 3.6) -> Figure:
    """One animation frame: the camera images (name, RGB with overlay) in two rows of three on
    the left, the BEV panels (each with its title, metric axes and the ego) on the right, the
    class legend along the bottom."""
    h, w = cameras[0][1].shape[:2]
    cols = (len(cameras) + 1) // 2
    panel_w = panel_height_in * (grid.y_max - grid.y_min) / (grid.x_max - grid.x_min)
    cams_w = cols * camera_width_in + 0.2
    bev_w = len(maps) * (panel_w + 0.5) + 0.5
    legend_in = legend_height_in(False)
    height = max(panel_height_in + 1.1, 2 * (camera_width_in * h / w + 0.3) + 0.4) + legend_in + (0.6 if title else 0.3)
    fig = Figure(figsize=(cams_w + bev_w, height), dpi=DPI)
    FigureCanvasAgg(fig)
    top = 1 - (0.75 if title else 0.45) / height  # suptitle, two-line panel titles
    bottom = (legend_in + 0.45) / height
    cams_h = 2 * camera_width_in * h / w + 0.35  # two rows of images and their names
    cam_top = top - max(0.0, (top - bottom) * height - cams_h) / 2 / height  # centred beside the BEV panels
    cam_grid = fig.add_gridspec(2, cols, left=0.1 / fig.get_figwidth(), right=cams_w / fig.get_figwidth(),
                                top=cam_top, bottom=cam_top - cams_h / height, wspace=0.04, hspace=0.2)
    for k, (name, image) in enumerate(cameras):
        ax = fig.add_subplot(cam_grid[k // cols, k % cols])
        ax.imshow(image, interpolation="nearest")
        ax.set_title(name.replace("CAM_", ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    bev_grid = fig.add_gridspec(1, len(maps), left=(cams_w + 0.6) / fig.get_figwidth(), right=1 - 0.1 / fig.get_figwidth(),
                                top=top, bottom=bottom, wspace=0.5 / panel_w)
    for k, m in enumerate(maps):
        ax = fig.add_subplot(bev_grid[0, k])
        caption = m.title
        if m.gt is not None:
            caption += f"\nmIoU {pct(miou(class_counts(np.asarray(m.ids), np.asarray(m.gt), class_names)))}"
        bev_panel(ax, colorize(bev_image(m.ids)), grid, caption, axis_labels=k == 0)
    if title:
        fig.suptitle(title, fontsize=10)
    add_legends(fig, class_names, errors=False)
    return fig
