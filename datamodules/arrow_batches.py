"""Random batches from memory-mapped Arrow columns, read as numpy views instead of row by row."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset


def chunk_as_numpy(chunk: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """A chunk of a fixed-shape column (Array2D/3D, fixed-length list, scalar) as a (rows, *shape) numpy view.

    Nested lists are flattened to their values, which Arrow keeps contiguous, so no byte is copied: the view
    reads the memory-mapped file and a 100 GB set costs only the pages a batch touches.
    """
    if isinstance(chunk, pa.ExtensionArray):
        chunk = chunk.storage
    while pa.types.is_list(chunk.type) or pa.types.is_fixed_size_list(chunk.type):
        chunk = chunk.flatten()
    return chunk.to_numpy(zero_copy_only=True).reshape(-1, *shape)


def feature_shape(feature) -> tuple[int, ...]:
    if isinstance(feature, (datasets.Array2D, datasets.Array3D)):
        return tuple(feature.shape)
    if isinstance(feature, datasets.List) and feature.length > 0:
        return (feature.length,)
    if isinstance(feature, datasets.Value):
        return ()
    raise ValueError(f"Expected a fixed-shape column (Array2D/3D, List with a length, Value), but got {feature}.")


class ArrowBatches(Dataset):
    """The fixed-shape columns of a `datasets.Dataset` as a map-style dataset that serves whole batches.

    `datasets`' own formatting turns each row's nested lists into tensors one element at a time, which on
    small images costs more than the training step; here a batch is one numpy gather per column and chunk
    (one chunk per shard of a concatenated set). A `DataLoader` hands `__getitems__`'s dict of batched
    tensors to its `collate_fn` as it is.
    """

    def __init__(self, dataset: datasets.Dataset) -> None:
        if dataset._indices is not None:
            raise ValueError(
                "ArrowBatches reads the table as stored: flatten_indices() a selected or shuffled dataset first."
            )
        self.num_rows = len(dataset)
        self.columns: dict[str, list[np.ndarray]] = {}
        for name, feature in dataset.features.items():
            shape = feature_shape(feature)
            self.columns[name] = [chunk_as_numpy(chunk, shape) for chunk in dataset.data.column(name).chunks]
        first = next(iter(self.columns.values()))
        self.chunk_starts = np.cumsum([0] + [len(chunk) for chunk in first])
        if self.chunk_starts[-1] != self.num_rows:
            raise ValueError(
                f"Expected the column chunks to hold {self.num_rows} rows, but they hold {self.chunk_starts[-1]}."
            )

    def __len__(self) -> int:
        return self.num_rows

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        chunk_of = np.searchsorted(self.chunk_starts, indices, side="right") - 1
        batch = {}
        for name, chunks in self.columns.items():
            out = np.empty((len(indices), *chunks[0].shape[1:]), dtype=chunks[0].dtype)
            for chunk in np.unique(chunk_of):
                rows = chunk_of == chunk
                out[rows] = chunks[chunk][indices[rows] - self.chunk_starts[chunk]]
            batch[name] = torch.from_numpy(out)
        return batch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: values[0] for name, values in self.__getitems__([index]).items()}
