"""Guide models for plug-and-play CFG distillation: small networks that steer a frozen UNet's decoder.

A guide G maps (CFG weight g - 1, z_t, t, condition c) to one residual per skip connection of a frozen
diffusers `UNet2DConditionModel` and one for its mid block, passed as `down_block_additional_residuals`
and `mid_block_additional_residual`. g is diffusers' `guidance_scale` (1 = no guidance); the guide reads g - 1,
the weight of `eps(c) + (g - 1) (eps(c) - eps(null))`, so 0 means no guidance. The UNet never changes, so a guide
trained on one UNet plugs into fine-tuned copies of it (same architecture) without retraining.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from plugguide.models.saving import HubModelMixin, load_saved, read_saved_config


def unet_signature(unet: UNet2DConditionModel) -> dict:
    """What a guide depends on: the channels of every skip connection and of the mid block, and the embedding sizes.

    The skip connections of `UNet2DConditionModel` are conv_in's output, then per down block one per
    resnet layer plus one for its downsampler (all but the last block).
    """
    config = unet.config
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    down = [channels[0]]
    for index, width in enumerate(channels):
        down += [width] * layers[index] + ([width] if index < len(channels) - 1 else [])
    time_embed_dim = unet.time_embedding.linear_2.out_features
    if unet.class_embedding is not None:
        condition_dim = time_embed_dim
    else:
        condition_dim = (
            config.cross_attention_dim
            if isinstance(config.cross_attention_dim, int)
            else config.cross_attention_dim[0]
        )
    return {
        "down_channels": down,
        "mid_channels": channels[-1],
        "time_embed_dim": time_embed_dim,
        "condition_dim": condition_dim,
    }


class Guide(nn.Module, HubModelMixin):
    """Base class of guide models: residuals for a frozen UNet's decoder, saved and loaded with that UNet.

    Subclasses take the UNet as first argument (so configs can give them as `Callable[[UNet2DConditionModel], Guide]`),
    set `init_args` to their other (JSON) arguments, and implement `residuals`. Saved like the classifiers, by
    `huggingface_hub.PyTorchModelHubMixin` (model.safetensors); the config.json names the class, its `init_args` and
    the UNet signature, since the UNet itself is not part of the guide: `load_guide` checks the signature and hands
    the UNet to `from_pretrained` as a constructor argument.

    Args:
        unet (`UNet2DConditionModel`): the frozen UNet the guide is built for; only its configuration (and, for
            `FullGuide`, its initial encoder weights) is used, it is not stored in the guide.
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(
                f"Guides steer a diffusers `UNet2DConditionModel`, but got `unet` of type {type(unet).__name__}."
            )
        self.signature = unet_signature(unet)
        self.init_args: dict = {}
        self.timesteps: list[int] | None = None  # a halved guide's sampler grid (`ProgressiveHalving`); None: any

    def check_unet(self, unet: UNet2DConditionModel) -> None:
        """Raises if `unet` has other skip connections or embeddings than the UNet the guide was built for."""
        signature = unet_signature(unet)
        if signature != self.signature:
            raise ValueError(
                f"`guide` {type(self).__name__} was built for a UNet with {self.signature}, but the UNet it is plugged into has "
                f"{signature}; a guide only plugs into UNets of the same architecture (fine-tuned copies); train one for this UNet."
            )

    def residuals(
        self,
        unet: UNet2DConditionModel,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cfg_weight: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(down_block_additional_residuals, mid_block_additional_residual) for this batch; `cfg_weight` = g - 1, (B,)."""
        raise NotImplementedError

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Writes config.json (class, `init_args`, UNet signature, sampler grid) and model.safetensors (the hub
        mixin's)."""
        config = {
            "guide_class": type(self).__name__,
            "init_args": self.init_args,
            "unet_signature": self.signature,
            "timesteps": self.timesteps,
        }
        super().save_pretrained(save_directory, config=config, **kwargs)


def condition_embedding(
    unet: UNet2DConditionModel, class_labels: torch.Tensor | None, encoder_hidden_states: torch.Tensor | None
) -> torch.Tensor:
    """The condition as one vector per example: the UNet's own class embedding, or mean-pooled text hidden states."""
    if unet.class_embedding is not None:
        if class_labels is None:
            raise ValueError("The UNet is class-conditional (`num_class_embeds` set); pass `class_labels`.")
        return unet.class_embedding(class_labels).to(unet.dtype)
    if encoder_hidden_states is None:
        raise ValueError("The UNet is text-conditional; pass `encoder_hidden_states`.")
    return encoder_hidden_states.mean(1)


def time_embedding(unet: UNet2DConditionModel, timestep: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The UNet's own timestep embedding (sinusoidal projection + MLP), shape (B, time_embed_dim)."""
    timestep = timestep.expand(batch_size) if timestep.ndim else timestep.reshape(1).expand(batch_size)
    return unet.time_embedding(unet.time_proj(timestep).to(unet.dtype))


class TinyGuide(Guide):
    """Tiny guide of "Plug-and-Play Diffusion Distillation" (Hsiao et al., CVPR 2024), Sec. 3.2 / Fig. 3.

    No encoder: `y = Z_out(phi(gamma + Z_t(c_time) + Z_c(c_cond)))`, with `gamma` a vector filled with the
    CFG weight g - 1, `c_time` the frozen UNet's timestep embedding, `c_cond` its class embedding (digits)
    or mean-pooled text hidden states (Stable Diffusion), `phi` a SiLU layer, and `Z_*` zero-initialised
    linear layers. `y` is split into one per-channel residual for each decoder skip connection and one for
    the mid block (broadcast over space), so a fresh guide is an exact no-op; its size and cost are measured in
    docs/results/guide_distillation.md.

    Args:
        unet (`UNet2DConditionModel`): the frozen UNet to steer (read for its channels and embedding sizes).
        hidden_dim (`int`, defaults to 64): width of the embedding `gamma + Z_t(c_time) + Z_c(c_cond)`.
    """

    def __init__(self, unet: UNet2DConditionModel, hidden_dim: int = 64) -> None:
        super().__init__(unet)
        if hidden_dim < 1:
            raise ValueError(f"Expected `hidden_dim` to be >= 1, but got {hidden_dim}.")
        self.init_args = {"hidden_dim": hidden_dim}
        signature = self.signature
        self.time_in = nn.Linear(signature["time_embed_dim"], hidden_dim)
        self.condition_in = nn.Linear(signature["condition_dim"], hidden_dim)
        self.mix = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU())
        self.split = signature["down_channels"] + [signature["mid_channels"]]
        self.out = nn.Linear(hidden_dim, sum(self.split))
        for layer in (self.time_in, self.condition_in, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def residuals(self, unet, sample, timestep, cfg_weight, class_labels=None, encoder_hidden_states=None):
        batch = sample.shape[0]
        gamma = cfg_weight.to(sample.dtype).reshape(-1, 1).expand(batch, self.time_in.out_features)
        hidden = (
            gamma
            + self.time_in(time_embedding(unet, timestep, batch))
            + self.condition_in(condition_embedding(unet, class_labels, encoder_hidden_states))
        )
        outputs = self.out(self.mix(hidden)).split(self.split, dim=1)
        outputs = [output[:, :, None, None] for output in outputs]
        return tuple(outputs[:-1]), outputs[-1]


class FullGuide(Guide):
    """Full guide of "Plug-and-Play Diffusion Distillation" (Hsiao et al., CVPR 2024): a ControlNet (Zhang et al., 2023).

    `ControlNetModel.from_unet` copies the UNet's encoder and mid block; its conditioning image is the
    CFG weight g - 1 broadcast to (1, H, W); its zero convolutions give one residual per skip connection
    and the mid block, so `eps'(z_t, c) = UNet(z_t, t, c; residuals = ControlNet(z_t, t, c, g - 1))` and a
    fresh guide is an exact no-op. It copies the UNet's encoder, so it is far larger than `TinyGuide` (measured in
    docs/results/guide_distillation.md).

    Args:
        unet (`UNet2DConditionModel`): the frozen UNet to steer (its encoder initialises the ControlNet).
        conditioning_channels (`list[int]`, defaults to `(16,)`): widths of the conditioning-map encoder; one entry
            keeps the map at the sample's resolution (the guidance map is constant, so downsampling it buys nothing).
    """

    def __init__(self, unet: UNet2DConditionModel, conditioning_channels: list[int] | tuple[int, ...] = (16,)) -> None:
        super().__init__(unet)
        conditioning_channels = tuple(conditioning_channels)
        if len(conditioning_channels) != 1:
            raise ValueError(
                f"Expected `conditioning_channels` to have one entry (the guidance map has the sample's size), but got {conditioning_channels}."
            )
        self.init_args = {"conditioning_channels": list(conditioning_channels)}
        self.controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=conditioning_channels, conditioning_channels=1
        )

    def residuals(self, unet, sample, timestep, cfg_weight, class_labels=None, encoder_hidden_states=None):
        batch = sample.shape[0]
        guidance_map = cfg_weight.to(sample.dtype).reshape(-1, 1, 1, 1).expand(batch, 1, *sample.shape[-2:])
        timestep = timestep.expand(batch) if timestep.ndim else timestep.reshape(1).expand(batch)
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=guidance_map,
            class_labels=class_labels,
            return_dict=False,
        )
        return tuple(down), mid


GUIDES = {"TinyGuide": TinyGuide, "FullGuide": FullGuide}

GuideFactory = Callable[[UNet2DConditionModel], Guide]
"""A guide class with its arguments but without the UNet, as configs give it (`class_path`, `init_args`)."""


def load_guide(path: str, unet: UNet2DConditionModel, setting: str = "guide_path") -> Guide:
    """Rebuilds a guide saved with `save_pretrained` for `unet`, checking that it was built for such a UNet."""
    config = read_saved_config(path, "config.json", setting, "Guide.save_pretrained")
    if config.get("guide_class") not in GUIDES:
        raise ValueError(
            f"`{setting}`={path!r} holds guide class {config.get('guide_class')!r}; allowed: {', '.join(GUIDES)}."
        )
    if config["unet_signature"] != unet_signature(unet):
        raise ValueError(
            f"`{setting}`={path!r} holds a guide built for a UNet with {config['unet_signature']}, but the UNet has "
            f"{unet_signature(unet)}; a guide only plugs into UNets of the same architecture."
        )
    guide = load_saved(GUIDES[config["guide_class"]], path, setting, "guide", unet=unet, **config["init_args"])
    guide.timesteps = config.get("timesteps")  # absent in guides saved before halved guides recorded their grid
    return guide


def predict_guided_noise(
    unet: UNet2DConditionModel,
    guide: Guide | None,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    cfg_weight: torch.Tensor | float | None,
    class_labels: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """eps'(z_t, c; G(g - 1, z_t, t, c)): one pass of the frozen UNet with the guide's residuals in its decoder.

    `cfg_weight` is g - 1 for diffusers' `guidance_scale` g, per example or one number (unused without a guide).
    """
    batch = sample.shape[0]
    timestep = torch.as_tensor(timestep, device=sample.device)
    timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep
    residuals = {}
    if guide is not None:
        cfg_weight = torch.as_tensor(cfg_weight, device=sample.device, dtype=sample.dtype)
        cfg_weight = cfg_weight.expand(batch) if cfg_weight.ndim == 0 else cfg_weight
        down, mid = guide.residuals(unet, sample, timestep, cfg_weight, class_labels, encoder_hidden_states)
        if len(down) != len(guide.signature["down_channels"]):
            raise ValueError(
                f"`guide` gave {len(down)} skip residuals, but the UNet has {len(guide.signature['down_channels'])} skip connections."
            )
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    eps = unet(sample, timestep, encoder_hidden_states, class_labels=class_labels, **residuals).sample
    return eps[:, : sample.shape[1]]
