"""The two speed settings of a frozen denoiser: reduced-precision autocast and `torch.compile`.

The pipelines run only the denoiser under autocast and hand its output back in the sample's dtype, so the
scheduler's arithmetic and every guidance gradient stay in full precision (a bf16 classifier gradient is
another method, not a faster one). Whether a setting changes results is measured, not assumed:
`python scripts/precision_table.py`.
"""

from __future__ import annotations

import torch
from torch import nn

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_autocast_dtype(name: str | torch.dtype | None, setting: str = "autocast_dtype") -> torch.dtype | None:
    """The torch dtype of `name` ("bfloat16", "float16"), None for full precision; anything else is refused by name."""
    if name is None or isinstance(name, torch.dtype) and name in AUTOCAST_DTYPES.values():
        return name
    if name not in AUTOCAST_DTYPES:
        raise ValueError(
            f"Unknown `{setting}`={name!r}; allowed: null (full precision), {', '.join(AUTOCAST_DTYPES)}."
        )
    return AUTOCAST_DTYPES[name]


def denoiser_autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """The autocast context of one denoiser call: off when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def compile_denoiser(denoiser: nn.Module) -> nn.Module:
    """Compiles `denoiser`'s forward in place (`nn.Module.compile`, TorchInductor) and returns it.

    In place, so the module keeps its diffusers class and `config`, which the pipelines read; a
    `torch.compile(denoiser)` wrapper would hide both. Each new batch shape compiles once (seconds for the
    digits UNet on a CPU, minutes for Stable Diffusion's).
    """
    denoiser.compile()
    return denoiser
