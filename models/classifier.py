"""Off-the-shelf classifiers: any timm model, saved and loaded like a hub model."""

from __future__ import annotations

from typing import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from plugguide.models.saving import HubModelMixin, load_saved


class TimmClassifier(nn.Module, HubModelMixin):
    """A timm classifier with `save_pretrained` / `from_pretrained` (config.json + model.safetensors).

    The embedded digits classifiers and a hub ImageNet model go through the same class: the config
    stores the timm name and keyword arguments, so loading rebuilds the exact architecture.
    Inputs are always images in [-1, 1], the diffusion models' range. The digits classifiers are trained
    on exactly that; a hub model (`normalize_input=True`) maps them to the mean, std and input size of its
    timm pretrained config itself, so guidance gradients flow through the normalisation and resizing.

    Args:
        model_name (`str`): a timm model name (`timm.list_models()`), e.g. `resnet18`, or `hf-hub:<repo>`.
        num_classes (`int`, *optional*, defaults to 10): classes of the head; None keeps the pretrained model's own
            head.
        in_chans (`int`, defaults to 1): input channels (1 for the digits).
        pretrained (`bool`, defaults to `False`): load timm's own pretrained weights (needs network access).
        model_kwargs (`dict`, *optional*): extra keyword arguments for `timm.create_model` (widths, depths, image size,
            ...).
        normalize_input (`bool`, defaults to `False`): map [-1, 1] inputs to the timm pretrained config's mean/std and
            input size.
        input_size (`int`, *optional*): the side inputs are resized to when `normalize_input`; default: the pretrained
            config's.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int | None = 10,
        in_chans: int = 1,
        pretrained: bool = False,
        model_kwargs: dict | None = None,
        normalize_input: bool = False,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        if not (timm.is_model(model_name) or model_name.startswith("hf-hub:")):
            raise ValueError(
                f"Unknown timm model `model_name`={model_name!r}; allowed: any name in `timm.list_models()` or 'hf-hub:<repo>'."
            )
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be at least 2, but got {num_classes}.")
        head = {} if num_classes is None else {"num_classes": num_classes}
        self.model = timm.create_model(
            model_name, pretrained=pretrained, in_chans=in_chans, **head, **(model_kwargs or {})
        )
        self.num_classes = self.model.num_classes
        self.in_chans = in_chans
        self.num_features = self.model.num_features
        self.input_size = None
        if normalize_input:
            config = timm.data.resolve_data_config(model=self.model)
            self.register_buffer(
                "input_mean", torch.tensor(config["mean"][:in_chans]).view(1, -1, 1, 1), persistent=False
            )
            self.register_buffer(
                "input_std", torch.tensor(config["std"][:in_chans]).view(1, -1, 1, 1), persistent=False
            )
            self.input_size = (input_size, input_size) if input_size else tuple(config["input_size"][1:])

    #: What the model predicts (`pipelines.tasks.default_task` reads it): one class per image.
    predicts = "class"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images to what the timm model expects (identity for the digits classifiers)."""
        if self.input_size is None:
            return images
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False)
        return ((images + 1) / 2 - self.input_mean) / self.input_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images))

    def output_head(self) -> nn.Module:
        """The classifier head (a PPAP expert may own a copy of it)."""
        return self.model.get_classifier()

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate (pre-logits) features, the ones FID is computed on, and the logits, from one pass."""
        features = self.model.forward_head(self.model.forward_features(self.preprocess(images)), pre_logits=True)
        return features, self.model.get_classifier()(features)


def load_classifier(path: str, setting: str = "classifier_path") -> TimmClassifier:
    """Loads a `TimmClassifier` saved with `save_pretrained`, or a pretrained timm hub model (`hf-hub:<repo>`, `timm:<name>`).

    Hub models keep their own head and take [-1, 1] images like every other classifier here (`normalize_input`).
    """
    if path.startswith(("hf-hub:", "timm:")):
        name = path.removeprefix("timm:")
        try:
            return TimmClassifier(name, num_classes=None, in_chans=3, pretrained=True, normalize_input=True)
        except Exception as error:  # noqa: BLE001 - re-raised with the setting named
            raise OSError(
                f"`{setting}`={path!r} could not be loaded from the hub (network access needed): {error}"
            ) from error
    return load_saved(TimmClassifier, path, setting, "classifier", "under assets/digits/")


def check_classifier_input(
    classifier: nn.Module,
    channels: int,
    image_size: int,
    setting: str,
    path: str | None = None,
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Fails early, naming the setting, if `classifier` cannot take the diffusion model's images.

    Checks the channel count (`in_chans`, where the classifier says it), then runs one probe image of `image_size`
    through `classify` (default: the classifier itself), so a ViT built for another size fails here, not at the
    first training or sampling batch.
    """
    named = f"`{setting}`" + (f"={path!r}" if path else "")
    in_chans = getattr(classifier, "in_chans", None) or channels
    if in_chans != channels:
        raise ValueError(
            f"The diffusion model makes {channels}-channel images but the classifier {named} takes {in_chans} channels."
        )
    probe = torch.zeros(1, channels, image_size, image_size, device=next(classifier.parameters()).device)
    was_training = classifier.training
    try:
        with torch.no_grad():
            classifier.eval()
            (classify or classifier)(probe)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ValueError(
            f"The diffusion model makes {image_size}x{image_size} images but the classifier {named} cannot classify them ({error}); "
            "use a classifier built for that size."
        ) from error
    finally:
        classifier.train(was_training)
