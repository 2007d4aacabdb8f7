"""Image grids for TensorBoard: tiles enlarged to a readable size, each row named in a label column on its left."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid


def label_column(labels: list[str], height: int, row_height: int, padding: int) -> torch.Tensor:
    """A white (3, height, width) column with `labels[i]` in black beside row i of `row_height`-pixel rows."""
    try:
        font = ImageFont.load_default(size=max(10, row_height // 3))
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(measure.textbbox((0, 0), label, font=font)[2] for label in labels) + 2 * padding + 4
    column = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(column)
    for row, label in enumerate(labels):
        middle = padding + row * (row_height + padding) + row_height // 2
        draw.text((width - padding - 2, middle), label, fill="black", font=font, anchor="rm")
    return torch.from_numpy(np.asarray(column).copy()).permute(2, 0, 1).float() / 255


def labelled_grid(
    images: torch.Tensor, nrow: int, row_labels: list[str] | None = None, scale: int = 4, padding: int = 2
) -> torch.Tensor:
    """The grid of `images` (N, C, H, W) in [0, 1], `nrow` per row, each tile enlarged `scale` times (nearest
    neighbour, so pixels stay sharp) and, with `row_labels`, a label column drawn left of the rows.

    Returns (3, H', W') in [0, 1].

    Args:
        images (torch.Tensor): tiles, row after row.
        nrow (int): tiles per row.
        row_labels (list[str] | None, default None): one name per row (e.g. the class it is guided toward).
        scale (int, default 4): enlargement of every tile.
        padding (int, default 2): white pixels between tiles.
    """
    tiles = F.interpolate(images.detach().float().cpu(), scale_factor=scale, mode="nearest")
    if tiles.shape[1] == 1:
        tiles = tiles.expand(-1, 3, -1, -1)
    grid = make_grid(tiles, nrow=nrow, padding=padding, pad_value=1.0)
    if not row_labels:
        return grid
    return torch.cat([label_column(row_labels, grid.shape[1], tiles.shape[2], padding), grid], dim=2)
