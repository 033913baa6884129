"""Plot helpers shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

SCATTER_LABEL_OFFSETS = (3, 13, -9, 23, -19, 33, -29, 43, -39)  # points above a marker, tried in turn


def annotate_clear(ax: Axes, text: str, point: tuple[float, float], offsets: tuple[int, ...], placed: list[Bbox],
                   renderer: RendererBase, dx: int = 4, arrow: bool = False, **text_kwargs) -> None:
    """Label `point` where the label overlaps none of the boxes in `placed` and stays inside the axes: `dx` points
    to the right at each vertical offset in `offsets` (points) in turn, then as far to the left; at the first of
    these places if none is free. The label's box is appended to `placed`.

    Args:
        arrow: draw a thin line back to the marker from a label placed anywhere but the first place.
        text_kwargs: passed to `ax.annotate` (`fontsize`, `va`, ...).
    """
    def annotate(x: int, dy: int, align: str):
        return ax.annotate(text, point, textcoords="offset points", xytext=(x, dy), ha=align, **text_kwargs)

    def is_free(x: int, dy: int, align: str) -> bool:
        probe = annotate(x, dy, align)
        box = probe.get_window_extent(renderer)
        probe.remove()
        inside = axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
        return inside and not any(box.overlaps(other) for other in placed)

    axes_box = ax.get_window_extent(renderer)
    places = [(dx, dy, "left") for dy in offsets] + [(-dx, dy, "right") for dy in offsets]
    x, dy, align = next((place for place in places if is_free(*place)), places[0])
    placed.append(annotate(x, dy, align).get_window_extent(renderer))
    if arrow and (x, dy) != (dx, offsets[0]):  # a separate annotation, so that the label's box is the text alone
        ax.annotate("", point, textcoords="offset points", xytext=(x, dy),
                    arrowprops={"arrowstyle": "-", "color": "0.6", "shrinkA": 0, "shrinkB": 3})


def marker_boxes(ax: Axes, points: list[tuple[float, float]], half_size: float = 4.0) -> list[Bbox]:
    """Display-space boxes of `half_size` pixels around each data point, for `annotate_clear` to keep labels off
    the markers."""
    centres = ax.transData.transform(points)
    return [Bbox.from_extents(x - half_size, y - half_size, x + half_size, y + half_size) for x, y in centres]


def scatter_labelled(ax: Axes, renderer: RendererBase, points: list[tuple[float, float]], labels: list[str],
                     colors: Optional[list[str]] = None, fontsize: int = 8) -> None:
    """Scatter `points` on `ax` (its scales and x limits already set) and label each where its label is clear of
    the markers and of the other labels (`annotate_clear`)."""
    for i, point in enumerate(points):
        ax.scatter(*point, s=40, zorder=3, color=colors[i] if colors else None)
    ax.autoscale_view()  # fixes the data-to-pixel transform before labels are placed
    placed = marker_boxes(ax, points)
    for label, point in zip(labels, points):
        annotate_clear(ax, label, point, SCATTER_LABEL_OFFSETS, placed, renderer, arrow=True, fontsize=fontsize,
                       va="center")


def params_scatter(rows: list[dict], metric: str, ylabel: str, title: str, path: Path) -> None:
    """Save to `path` a scatter of each row's `metric` against its ``trainable_params`` (log axis), labelled with
    its ``label``."""
    figure = Figure(figsize=(6.4, 4))
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.86)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.set_xscale("log")
    ax.set_xlim(min(r["trainable_params"] for r in rows) / 2, max(r["trainable_params"] for r in rows) * 10)
    scatter_labelled(ax, figure.canvas.get_renderer(), [(r["trainable_params"], r[metric]) for r in rows],
                     [r["label"] for r in rows])
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
