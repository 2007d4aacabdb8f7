"""A one-pass guide for any denoiser: a small network that predicts classifier guidance's score shift itself."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from torch import nn

from plugguide.models.saving import HubModelMixin, load_saved


class ShiftGuide(nn.Module, HubModelMixin):
    """Predicts the shift `d = -s sigma_t grad_{x_t} log p(y | x_t)` that classifier guidance adds to a denoiser's eps.

    Gradient guidance needs the guide's forward and backward pass at every step; this network is trained
    (`GuidanceDistillation`) to give the same shift in one forward pass from what the step already has, so sampling
    loads no classifier: `eps'(x_t) = eps(x_t) + d`, with

        d = G(x_t, x0_hat, s; t, y),

    x_t the variance-preserving sample, x0_hat the frozen denoiser's own clean estimate (`(x_t - sigma_t eps) /
    alpha_t`), s the guidance scale given as a constant input map (so a halved guide, whose shift is not linear in s,
    can still serve every s), t the train timestep and y the target class, both through diffusers `UNet2DModel`'s
    timestep and class embeddings. The frozen denoiser is not part of the guide: one guide plugs into any denoiser
    with the same noise schedule and sample shape (a fine-tuned copy), and needs no particular architecture, so
    unconditional `UNet2DModel`s are served as well as conditional UNets and transformers. Its output convolution
    starts at zero, so a fresh guide is an exact no-op. Saved by `huggingface_hub.PyTorchModelHubMixin`
    (config.json + model.safetensors); the config also holds the scales the guide was trained on and what it was
    distilled from, so a sampler can refuse a scale the guide never saw (`DistilledGuidance`).

    Args:
        sample_size (`int`): side of the denoiser's (square) sample, pixels or latents.
        channels (`int`): its channels.
        num_classes (`int`): target classes y.
        block_out_channels (`list[int]`, defaults to `(16, 32)`): widths of the guide's UNet levels.
        layers_per_block (`int`, defaults to 1): residual blocks per level.
        scale_range (`tuple[float, float]`, *optional*): (low, high) of the scales s the guide was trained on; None:
            unknown (a guide saved before the range was recorded, or one built by hand).
        distilled_from (`dict`, *optional*): the teacher guidance it learned, as `describe_teacher` writes it (its
            class, where its classifier or experts came from, its settings that shape the shift).
        timesteps (`list[int]`, *optional*): a halved guide's sampler grid, the DDIM timesteps it was halved on
            (`GuidanceHalving`); it samples with `GridDDIMScheduler` on exactly these. None: trained at every timestep.
    """

    def __init__(
        self,
        sample_size: int,
        channels: int,
        num_classes: int,
        block_out_channels: list[int] | tuple[int, ...] = (16, 32),
        layers_per_block: int = 1,
        scale_range: Sequence[float] | None = None,
        distilled_from: dict | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if scale_range is not None:
            check_scale_range(scale_range)
        for name, value in (("sample_size", sample_size), ("channels", channels), ("num_classes", num_classes)):
            if value < 1:
                raise ValueError(f"Expected `{name}` to be >= 1, but got {value}.")
        widths = list(block_out_channels)
        if not widths or min(widths) < 8 or any(width % 8 for width in widths):
            raise ValueError(
                f"Expected `block_out_channels` to be one or more multiples of 8 (group norm of 8 groups), but got {widths}."
            )
        self.num_classes = num_classes
        self.scale_range = None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        self.distilled_from = distilled_from
        self.timesteps = None if timesteps is None else [int(t) for t in timesteps]
        self.net = UNet2DModel(
            sample_size=sample_size,
            in_channels=2 * channels + 1,
            out_channels=channels,
            block_out_channels=widths,
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * len(widths),
            up_block_types=("UpBlock2D",) * len(widths),
            norm_num_groups=8,
            num_class_embeds=num_classes,
            add_attention=False,
        )
        nn.init.zeros_(self.net.conv_out.weight)
        nn.init.zeros_(self.net.conv_out.bias)

    def forward(
        self,
        sample: torch.Tensor,
        x0_hat: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        scale: torch.Tensor | float,
    ) -> torch.Tensor:
        """The eps shift d (B, C, H, W) at the variance-preserving `sample` x_t, train `timesteps` (B,) or scalar,
        target `class_labels` (B,) and guidance scale `scale` (B,) or scalar."""
        channels, size = self.net.config.out_channels, self.net.config.sample_size
        if tuple(sample.shape[1:]) != (channels, size, size) or x0_hat.shape != sample.shape:
            raise ValueError(
                f"The guide was built for samples of {channels} channels at {size}x{size} (B, C, H, W), but got a sample "
                f"of shape {tuple(sample.shape)} and an x0_hat of shape {tuple(x0_hat.shape)}; train a guide for this "
                "denoiser's samples."
            )
        batch = sample.shape[0]
        scale = torch.as_tensor(scale, device=sample.device, dtype=sample.dtype).expand(batch)
        scale_map = scale.view(-1, 1, 1, 1).expand(batch, 1, *sample.shape[-2:])
        timesteps = torch.as_tensor(timesteps, device=sample.device).expand(batch)
        inputs = torch.cat([sample, x0_hat.to(sample.dtype), scale_map], dim=1)
        return self.net(inputs, timesteps, class_labels=class_labels.to(sample.device)).sample

    def halving_student(self, scale_range: Sequence[float], timesteps: Sequence[int]) -> ShiftGuide:
        """A copy of this guide (same weights, same teacher) that a halving stage trains further on `scale_range` and
        the sampler grid `timesteps`, and says so when saved."""
        config = self.net.config
        guide = ShiftGuide(
            config.sample_size,
            config.out_channels,
            self.num_classes,
            list(config.block_out_channels),
            config.layers_per_block,
            scale_range,
            self.distilled_from,
            timesteps,
        )
        guide.load_state_dict(self.state_dict())
        return guide.to(self.net.device, self.net.dtype).train(self.training)


def check_scale_range(scale_range: Sequence[float], setting: str = "scale_range") -> None:
    """Fails, naming `setting`, unless `scale_range` is (low, high) with finite 0 < low <= high."""
    values = list(scale_range)
    if len(values) != 2 or not all(math.isfinite(value) and value > 0 for value in values) or values[0] > values[1]:
        raise ValueError(f"Expected `{setting}` to be (low, high) with finite 0 < low <= high, but got {scale_range}.")


def load_shift_guide(path: str, setting: str = "guide") -> ShiftGuide:
    """A `ShiftGuide` saved with `save_pretrained`; a wrong or damaged folder fails naming `setting`."""
    return load_saved(ShiftGuide, path, setting, "ShiftGuide")
