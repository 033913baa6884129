"""Plot helpers shared by the benchmark scripts."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.transforms import Bbox


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
