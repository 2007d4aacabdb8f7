"""TensorBoard grids: tiles enlarged without blurring, one label per row on the left."""

from __future__ import annotations

import torch

from plugguide.callbacks.labelled_grid import labelled_grid


def test_tiles_are_enlarged_four_times_by_nearest_neighbour():
    torch.manual_seed(0)
    images = torch.rand(6, 1, 16, 16)
    grid = labelled_grid(images, nrow=3, padding=2)
    assert grid.shape == (3, 2 + 2 * (64 + 2), 2 + 3 * (64 + 2))
    first = grid[0, 2:66, 2:66]
    assert torch.equal(first, images[0, 0].repeat_interleave(4, 0).repeat_interleave(4, 1))


def test_each_row_gets_a_label_on_its_left():
    images = torch.ones(20, 1, 16, 16)  # white tiles: any dark pixel is a label's
    plain = labelled_grid(images, nrow=2)
    grid = labelled_grid(images, nrow=2, row_labels=[f"class {k}" for k in range(10)])
    width = grid.shape[2] - plain.shape[2]
    assert width > 0 and torch.equal(grid[:, :, width:], plain)
    column = grid[0, :, :width]
    for row in range(10):
        band = column[2 + row * 66 : 2 + row * 66 + 64]
        assert (band < 0.5).any(), f"row {row} has no label"


def test_the_sample_writer_names_rows_only_when_each_row_targets_one_class():
    from plugguide.callbacks.sample_writer import class_rows

    assert class_rows(torch.arange(3).repeat_interleave(2), nrow=2) == ["class 0", "class 1", "class 2"]
    assert class_rows(torch.tensor([0, 1, 1, 1]), nrow=2) is None  # a mixed row
    assert class_rows(torch.full((4,), -1), nrow=2) is None  # unguided samples
