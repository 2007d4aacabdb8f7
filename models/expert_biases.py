"""Per-expert biases for layers whose bias the experts would otherwise share."""

from __future__ import annotations

import torch
from torch import nn


class ExpertBias(nn.Module):
    """Gives each of N experts its own bias of one layer: output + delta_n, as training b_n = b + delta_n would.

    A forward hook on the layer (Linear or convolution) adds the active expert's delta, zero at the start, to the
    frozen layer's output; the layer itself, and so the off-the-shelf model saved beside the experts, stays untouched.
    One difference from training the bias itself, as the authors' adapters do: AdamW's weight decay pulls delta_n, and
    so b_n toward the pretrained b rather than toward 0.

    Args:
        layer (`nn.Linear` or `nn.Conv2d`): the layer; it must have a bias.
        num_experts (`int`): N.
    """

    def __init__(self, layer: nn.Module, num_experts: int) -> None:
        super().__init__()
        self.deltas = nn.ParameterList(torch.zeros_like(layer.bias) for _ in range(num_experts))
        self.channel_dim = -1 if isinstance(layer, nn.Linear) else 1
        self.active = 0
        layer.register_forward_hook(self)

    def forward(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = self.deltas[self.active]
        if self.channel_dim == 1:
            delta = delta.view(-1, *([1] * (output.dim() - 2)))
        return output + delta
