"""Figures of predictions and metrics, with matplotlib alone and headless (figures are built on
matplotlib.figure.Figure, never pyplot, so no display or global state is involved).

Every figure has a fixed size in inches at FIGURE_DPI, so its PNG has a known pixel size:
    shape_figure   ground truth | prediction, one colour per part         SHAPE_SIZE
    cls_figure     the shape, true and predicted class in the title       CLS_SIZE
    room_figure    top-down and oblique views, ground truth | prediction  ROOM_SIZE
    per_class_figure, confusion_figure                                    CHART_SIZE, CONFUSION_SIZE
Shapes are drawn with y up (ShapeNet / ModelNet40 and the synthetic shapes), rooms with z up
(S3DIS). Clouds above MAX_DRAWN_POINTS are drawn from a fixed random subset of their points.
"""
import os

import numpy as np

FIGURE_DPI = 100
SHAPE_SIZE = (8.0, 4.2)
CLS_SIZE = (4.2, 4.2)
ROOM_SIZE = (10.0, 9.0)
CHART_SIZE = (8.0, 4.5)
CONFUSION_SIZE = (8.0, 7.0)
MAX_DRAWN_POINTS = 20000


def pixel_size(figsize):
    """(width, height) in pixels of a figure of `figsize` inches saved by save_figure."""
    return round(figsize[0] * FIGURE_DPI), round(figsize[1] * FIGURE_DPI)


def palette(n):
    """(n, 3) RGB in [0, 1]: tab10 / tab20 for up to 20 ids, evenly spaced hues beyond."""
    from matplotlib import colormaps
    if n <= 10:
        return np.array(colormaps["tab10"].colors[:n])
    if n <= 20:
        return np.array(colormaps["tab20"].colors[:n])
    return colormaps["hsv"](np.arange(n) / n)[:, :3]


def _figure(figsize):
    from matplotlib.figure import Figure
    return Figure(figsize=figsize, dpi=FIGURE_DPI)


def _drawn(n, limit=MAX_DRAWN_POINTS):
    """Indices of the points to draw: all of them, or a fixed random subset of `limit`."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, limit, replace=False))


def _scatter3d(fig, position, xyz, colours, title, up, elev=20, azim=-60, size=2.0):
    """A 3-D scatter on equal axes; `up` names the vertical axis ("y" or "z")."""
    ax = fig.add_subplot(*position, projection="3d")
    x, y, z = xyz.T
    horizontal, depth, vertical = (x, z, y) if up == "y" else (x, y, z)
    ax.scatter(horizontal, depth, vertical, c=colours, s=size, linewidths=0, depthshade=False)
    centre = (xyz.max(0) + xyz.min(0)) / 2
    half = max(float((xyz.max(0) - xyz.min(0)).max()) / 2, 1e-6)
    order = (0, 2, 1) if up == "y" else (0, 1, 2)
    for set_lim, axis in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), order):
        set_lim(centre[axis] - half, centre[axis] + half)
    ax.set_box_aspect((1, 1, 1), zoom=1.35)  # the default leaves wide margins around the cloud
    ax.view_init(elev=elev, azim=azim)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    return ax


def _legend(fig, names, colours, ncol):
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color=c, label=n) for n, c in zip(names, colours)],
               loc="lower center", ncol=ncol, fontsize=8, frameon=False)


def shape_figure(xyz, label, pred, part_names, title=""):
    """xyz (N, 3); label, pred (N,) ids 0..len(part_names)-1 (a part segmentation shape's
    parts numbered within its category). Ground truth left, prediction right."""
    keep = _drawn(len(xyz))
    xyz, label, pred = np.asarray(xyz)[keep], np.asarray(label)[keep], np.asarray(pred)[keep]
    colours = palette(len(part_names))
    fig = _figure(SHAPE_SIZE)
    accuracy = float((label == pred).mean())
    _scatter3d(fig, (1, 2, 1), xyz, colours[label], "ground truth", up="y", size=3)
    _scatter3d(fig, (1, 2, 2), xyz, colours[pred], f"prediction ({100 * accuracy:.1f}% points)",
               up="y", size=3)
    _legend(fig, part_names, colours, ncol=min(len(part_names), 6))
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0, right=1, bottom=0.1, top=0.88, wspace=0)
    return fig


def cls_figure(xyz, true_name, pred_name, title=""):
    """One shape, green when the predicted class is right and red when it is wrong."""
    keep = _drawn(len(xyz))
    fig = _figure(CLS_SIZE)
    colour = "tab:green" if true_name == pred_name else "tab:red"
    _scatter3d(fig, (1, 1, 1), np.asarray(xyz)[keep], colour, "", up="y", size=3)
    fig.suptitle(f"{title}\ntrue: {true_name}, predicted: {pred_name}", fontsize=9)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.88)
    return fig


def room_figure(xyz, label, pred, class_names, title=""):
    """xyz (N, 3) of a room, z up; label, pred (N,) class ids. Rows: top-down view, oblique
    view; columns: ground truth, prediction."""
    keep = _drawn(len(xyz))
    xyz, label, pred = np.asarray(xyz)[keep], np.asarray(label)[keep], np.asarray(pred)[keep]
    colours = palette(len(class_names))
    fig = _figure(ROOM_SIZE)
    # Top-down: points sorted by height so the highest is drawn last, as seen from above,
    # except that the ceiling (the top 10% of the room's height) would hide everything.
    z = xyz[:, 2]
    below_ceiling = z <= z.min() + 0.9 * (z.max() - z.min())
    top_order = np.flatnonzero(below_ceiling)[np.argsort(z[below_ceiling])]
    for column, (ids, name) in enumerate(((label, "ground truth"), (pred, "prediction"))):
        ax = fig.add_subplot(2, 2, column + 1)
        ax.scatter(xyz[top_order, 0], xyz[top_order, 1], c=colours[ids[top_order]], s=1,
                   linewidths=0)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_title(f"{name}, top-down (ceiling hidden)", fontsize=10)
        _scatter3d(fig, (2, 2, column + 3), xyz, colours[ids], f"{name}, oblique", up="z",
                   elev=35, azim=-50, size=1)
    accuracy = float((label == pred).mean())
    _legend(fig, class_names, colours, ncol=min(len(class_names), 7))
    fig.suptitle(f"{title}  ({100 * accuracy:.1f}% points right)", fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.08, top=0.92, wspace=0.05, hspace=0.1)
    return fig


def per_class_figure(names, values, ylabel, title=""):
    """Bar chart of one value per class / category (fractions; None or NaN drawn as absent)."""
    fig = _figure(CHART_SIZE)
    ax = fig.add_subplot(1, 1, 1)
    heights = [np.nan if v is None else 100 * v for v in values]
    x = np.arange(len(names))
    ax.bar(x, np.nan_to_num(heights), color=palette(len(names)))
    for i, h in enumerate(heights):
        ax.text(i, (0 if np.isnan(h) else h) + 1, "-" if np.isnan(h) else f"{h:.1f}",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    slanted = len(names) > 8
    ax.set_xticklabels(names, rotation=45 if slanted else 0, ha="right" if slanted else "center",
                       fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel(f"{ylabel} (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def confusion_figure(confusion, names, title=""):
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction; each row
    sums to 1 over the row's points or shapes), counts in the cells when there are few classes."""
    confusion = np.asarray(confusion, dtype=np.float64)
    recall = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig = _figure(CONFUSION_SIZE)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = np.arange(len(names))
    fontsize = 8 if len(names) <= 20 else 5
    ax.set_xticks(ticks)
    ax.set_xticklabels(names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks)
    ax.set_yticklabels(names, fontsize=fontsize)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if len(names) <= 15:
        for i, j in zip(*np.nonzero(confusion)):
            ax.text(j, i, f"{int(confusion[i, j])}", ha="center", va="center", fontsize=6,
                    color="white" if recall[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig, path):
    """Write `fig` as a PNG of exactly its size in pixels (atomically: temp file, rename)."""
    from lib.checkpoint import atomic_write
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=FIGURE_DPI))
    return path


def figure_image(fig):
    """(H, W, 3) uint8 pixels of a figure (for tensorboard's add_image)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
