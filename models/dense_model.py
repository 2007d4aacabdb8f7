"""Dense off-the-shelf models (semantic segmenters, depth regressors) of three libraries, saved and loaded like a hub model."""

from __future__ import annotations

from typing import Literal

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
import torchvision
import transformers
from torch import nn

from plugguide.models.saving import HubModelMixin, load_saved

Library = Literal["smp", "torchvision", "transformers"]
LIBRARIES = ("smp", "torchvision", "transformers")


def build_library_model(
    library: str, architecture: str, num_classes: int | None, in_chans: int, model_kwargs: dict
) -> nn.Module:
    """The bare network of `library`, randomly initialised (weights are loaded afterwards)."""
    if library == "smp":
        return smp.create_model(
            architecture, encoder_weights=None, in_channels=in_chans, classes=num_classes or 1, **model_kwargs
        )
    if library == "torchvision":
        return torchvision.models.get_model(
            architecture, weights=None, weights_backbone=None, num_classes=num_classes, **model_kwargs
        )
    config = transformers.AutoConfig.for_model(**model_kwargs)
    return getattr(transformers, architecture)(config)


class DenseModel(nn.Module, HubModelMixin):
    """A segmenter (a class per pixel) or a dense regressor (a value per pixel, e.g. depth), library-agnostic.

    The digits' segmenter and distance regressor (segmentation-models-pytorch with a timm encoder), torchvision's
    `deeplabv3_resnet50` and a transformers `DPTForDepthEstimation` (MiDaS) all go through this class: the config
    names the library, the architecture and its keyword arguments, so `from_pretrained` rebuilds the exact network
    offline (config.json + model.safetensors, like `TimmClassifier`). Inputs are images in [-1, 1], the diffusion
    models' range; with `input_mean` / `input_std` they are mapped to [0, 1] and normalised, and with `input_size`
    resized, inside the forward pass, so guidance gradients flow through both. Outputs come back at the input's
    resolution: per-pixel logits (B, C, H, W) for a segmenter, a map (B, H, W) for a regressor.

    Args:
        library (`str`, defaults to `"smp"`): "smp" (segmentation-models-pytorch), "torchvision" (`torchvision.models`
            segmentation models) or "transformers".
        architecture (`str`, defaults to `"Unet"`): an smp architecture ("Unet", "DeepLabV3Plus", ...), a torchvision
            model name ("deeplabv3_resnet50"), or a transformers model class ("DPTForDepthEstimation").
        num_classes (`int`, *optional*): classes per pixel of a segmenter; None for a regressor (one value per pixel).
        in_chans (`int`, defaults to 1): input channels (1 for the digits).
        model_kwargs (`dict`, *optional*): keyword arguments of the network: smp `create_model`'s (encoder name and
            depth, decoder channels, and any timm encoder argument such as `layers` or `channels`), torchvision
            `get_model`'s, or the transformers model config as a dict (with its `model_type`).
        input_mean (`list[float]`, *optional*): per-channel mean of the network's [0, 1] inputs; None: the network
            takes [-1, 1] images as they are.
        input_std (`list[float]`, *optional*): per-channel std, with `input_mean`.
        input_size (`int`, *optional*): the side the network sees (inputs are resized to it, outputs back); None: the
            input's own.
    """

    def __init__(
        self,
        library: Library = "smp",
        architecture: str = "Unet",
        num_classes: int | None = None,
        in_chans: int = 1,
        model_kwargs: dict | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        if library not in LIBRARIES:
            raise ValueError(f"Expected `library` to be one of {LIBRARIES}, but got {library!r}.")
        if num_classes is not None and num_classes < 2:
            raise ValueError(
                f"Expected `num_classes` to be at least 2 (or None for a regressor), but got {num_classes}."
            )
        if (input_mean is None) != (input_std is None):
            raise ValueError("Give both `input_mean` and `input_std`, or neither.")
        try:
            self.model = build_library_model(library, architecture, num_classes, in_chans, dict(model_kwargs or {}))
        except (ValueError, KeyError, AttributeError, TypeError) as error:
            raise ValueError(
                f"`architecture`={architecture!r} of `library`={library!r} could not be built with `model_kwargs`={model_kwargs} ({error})."
            ) from error
        self.library = library
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.input_size = input_size
        if input_mean is not None:
            self.register_buffer("input_mean", torch.tensor(input_mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("input_std", torch.tensor(input_std).view(1, -1, 1, 1), persistent=False)
        else:
            self.input_mean = self.input_std = None

    @property
    def predicts(self) -> str:
        """ "class_map" for a segmenter, "map" for a regressor (`pipelines.tasks.default_task` reads it)."""
        return "class_map" if self.num_classes else "map"

    def output_head(self) -> nn.Module:
        """The layer that turns features into the per-pixel output (a PPAP expert may own a copy of it)."""
        if self.library == "smp":
            return self.model.segmentation_head
        if self.library == "torchvision":
            return self.model.classifier[-1]
        return self.model.head

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_mean is not None:
            images = ((images + 1) / 2 - self.input_mean) / self.input_std
        if self.input_size is not None and tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.model(self.preprocess(images))
        if self.library == "torchvision":
            output = output["out"]
        elif self.library == "transformers":
            output = output.logits if self.num_classes else output.predicted_depth
        if output.dim() == 3:
            output = output.unsqueeze(1)
        if tuple(output.shape[-2:]) != tuple(images.shape[-2:]):
            output = F.interpolate(output, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return output if self.num_classes else output[:, 0]


def load_dense_model(path: str, setting: str = "model_path") -> DenseModel:
    """A `DenseModel` saved with `save_pretrained`, or a pretrained hub model: `torchvision:<name>` (e.g.
    `torchvision:deeplabv3_resnet50`) or `transformers:<repo>` (e.g. `transformers:Intel/dpt-hybrid-midas`).

    A hub model is built from its config, its weights loaded into it, and its own preprocessing (mean, std, input
    size) recorded, so that a copy saved with `save_pretrained` loads again without network access.
    """
    if path.startswith(("torchvision:", "transformers:")):
        try:
            return hub_dense_model(*path.split(":", 1))
        except Exception as error:  # noqa: BLE001 - re-raised with the setting named
            raise OSError(
                f"`{setting}`={path!r} could not be loaded from the hub (network access needed): {error}"
            ) from error
    return load_saved(DenseModel, path, setting, "dense model", "assets/digits/segmenter and assets/digits/depth")


def hub_dense_model(library: str, name: str) -> DenseModel:
    """A pretrained torchvision segmentation model or transformers dense model as a `DenseModel` (network access)."""
    if library == "torchvision":
        weights = torchvision.models.get_model_weights(name).DEFAULT
        preprocessing = weights.transforms()
        model = DenseModel(
            "torchvision",
            name,
            num_classes=len(weights.meta["categories"]),
            in_chans=3,
            model_kwargs={"aux_loss": False},
            input_mean=list(preprocessing.mean),
            input_std=list(preprocessing.std),
            input_size=preprocessing.resize_size[0],
        )
        # The auxiliary head only serves training; the guide is the main output.
        state = {
            k: v for k, v in weights.get_state_dict(progress=False).items() if not k.startswith("aux_classifier.")
        }
        model.model.load_state_dict(state)
        return model
    network = transformers.AutoModelForDepthEstimation.from_pretrained(name)
    processor = transformers.AutoImageProcessor.from_pretrained(name)
    size = processor.size.get("height") or processor.size.get("shortest_edge")
    model = DenseModel(
        "transformers",
        type(network).__name__,
        num_classes=None,
        in_chans=3,
        model_kwargs=network.config.to_dict(),
        input_mean=list(processor.image_mean),
        input_std=list(processor.image_std),
        input_size=size,
    )
    model.model.load_state_dict(network.state_dict())
    return model
