"""Sampling where every image's noise follows from its own seed, whatever the batch or the number of processes."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline


def sample_batch(pipeline: DiffusionPipeline, batch: dict, **call_kwargs) -> torch.Tensor:
    """Samples one image per (label, seed) of `batch` with `pipeline`, in [-1, 1]; toward `batch["target_map"]`, where it
    has one, for dense guides.

    Each sample gets its own `torch.Generator` seeded with its seed, so its initial and step noise are the same
    in a batch of 1 and of 500, on one device and on eight.
    """
    device = pipeline.unet.device
    generators = [torch.Generator(device).manual_seed(int(seed)) for seed in batch["seed"]]
    targets = {"targets": batch["target_map"]} if "target_map" in batch else {}
    output = pipeline(class_labels=batch["label"], generator=generators, output_type="pt", **targets, **call_kwargs)
    return output.images * 2 - 1
