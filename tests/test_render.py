"""Figures: one distinct colour per class at any class count, PNGs of exactly the promised pixel
size, missing values drawn as absent rather than failing, and tensorboard's pixel array."""
import numpy as np
import pytest
from PIL import Image

from lib.render import (CHART_SIZE, CONFUSION_SIZE, ROOM_SIZE, confusion_figure, figure_image,
                        palette, per_class_figure, pixel_size, room_figure, save_figure)


@pytest.mark.parametrize("n", [2, 13, 17, 50])
def test_palette_gives_every_class_its_own_colour(n):
    colours = palette(n)
    assert colours.shape == (n, 3) and len(np.unique(colours.round(4), axis=0)) == n


def test_room_figure_png_has_the_promised_size(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, [6, 4, 3], size=(3000, 3))
    label = (xyz[:, 2] > 2.7).astype(int)  # a "ceiling" and the rest
    path = save_figure(room_figure(xyz, label, 1 - label, ["ceiling", "floor"], "room"),
                       str(tmp_path / "room.png"))
    with Image.open(path) as image:
        assert image.size == pixel_size(ROOM_SIZE)


def test_per_class_chart_draws_missing_values_as_absent():
    fig = per_class_figure(["a", "b", "c"], [0.5, None, float("nan")], "IoU", "chart")
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == [50.0, 0.0, 0.0]
    assert figure_image(fig).shape == pixel_size(CHART_SIZE)[::-1] + (3,)


def test_confusion_image_is_the_promised_size():
    fig = confusion_figure(np.array([[5, 1], [0, 3]]), ["x", "y"])
    assert figure_image(fig).shape == pixel_size(CONFUSION_SIZE)[::-1] + (3,)
