"""Off-the-shelf classifiers: any timm model, saved and loaded like a hub model."""

from __future__ import annotations

import os

import timm
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn


class TimmClassifier(nn.Module, PyTorchModelHubMixin):
    """A timm classifier with `save_pretrained` / `from_pretrained` (config.json + model.safetensors).

    The embedded digits classifiers and a hub ImageNet model go through the same class: the config
    stores the timm name and keyword arguments, so loading rebuilds the exact architecture.

    Args:
        model_name: a timm model name (`timm.list_models()`), e.g. `resnet18` or `deit_tiny_patch16_224`.
        num_classes: classes of the head.
        in_chans: input channels (1 for the digits).
        pretrained: load timm's own pretrained weights (needs network access).
        model_kwargs: extra keyword arguments for `timm.create_model` (widths, depths, image size, ...).
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int = 10,
        in_chans: int = 1,
        pretrained: bool = False,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(model_name):
            raise ValueError(f"Unknown timm model `model_name`={model_name!r}; allowed: any name in `timm.list_models()`.")
        if num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be at least 2, but got {num_classes}.")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **(model_kwargs or {}))
        self.num_features = self.model.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate (pre-logits) features, the ones FID is computed on."""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def load_classifier(path: str, setting: str = "classifier_path") -> TimmClassifier:
    """Loads a `TimmClassifier` saved with `save_pretrained`, naming `setting` if the path is wrong."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"`{setting}`={path!r} is not a saved classifier: expected a directory with config.json and "
            "model.safetensors written by `TimmClassifier.save_pretrained` (the embedded ones are under assets/digits/)."
        )
    return TimmClassifier.from_pretrained(path, strict=True)
