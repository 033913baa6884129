"""Plot helpers shared by the benchmark scripts."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.transforms import Bbox


def annotate_clear(ax: Axes, text: str, point: tuple[float, float], offsets: tuple[int, ...], placed: list[Bbox],
                   renderer: RendererBase, dx: int = 4, arrow: bool = False, **text_kwargs) -> None:
    """Label `point` `dx` points to the right at the first vertical offset in `offsets` (points) whose label
    overlaps none of the boxes in `placed` (at the last offset if all do), and append the label's box to `placed`.

    Args:
        arrow: draw a thin line from a label that was moved off the marker's height back to the marker.
        text_kwargs: passed to `ax.annotate` (`fontsize`, `va`, ...).
    """
    for dy in offsets:
        label = ax.annotate(text, point, textcoords="offset points", xytext=(dx, dy),
                            arrowprops={"arrowstyle": "-", "color": "0.6"} if arrow and dy else None, **text_kwargs)
        box = label.get_window_extent(renderer)
        if dy == offsets[-1] or not any(box.overlaps(other) for other in placed):
            break
        label.remove()
    placed.append(box)
