"""CLIP's image tower as a guide: images in [-1, 1] at any size to L2-normalised image embeddings, differentiably."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import transformers
from torch import nn

# `model_type` of the configs this wrapper reads: a whole CLIP (both towers) or its image tower with the projection.
CLIP_MODEL_TYPES = {"clip": transformers.CLIPModel, "clip_vision_model": transformers.CLIPVisionModelWithProjection}


class CLIPImageEmbedder(nn.Module):
    """e(x) = P(V(preprocess(x))) / |P(V(preprocess(x)))|: CLIP's projected image embedding on the unit sphere.

    CLIP (Radford et al., 2021) scores an image against a text or another image by the cosine of their embeddings;
    guiding toward a prompt or a reference image (TFG's style guidance, Ye et al., 2024; EluCD's text-guided samples,
    Ma et al., 2023) differentiates that cosine with respect to the predicted clean image. The image processor's steps
    are done here on tensors, so the gradient reaches the image: `(x + 1) / 2` (the processor's rescale to [0, 1]),
    bicubic resize of the shortest edge to `size["shortest_edge"]` (or to a fixed height and width; antialiased, as the
    processor's resize), centre crop to `crop_size` where the processor crops, then `(x - mean) / std`. Mean, std and sizes come from the checkpoint's preprocessor config; one
    without it takes `CLIPImageProcessor`'s defaults at the vision config's `image_size`.

    The module says what it is to the rest of the project: `predicts = "embedding"` (its task is
    `pipelines.tasks.EmbeddingSimilarityTask`), `embedding_dim` (the projection size targets must have), `logit_scale`
    (the temperature CLIP was trained with, exp(t): the task's default scale, so the log-likelihood is the logit CLIP
    itself puts on the pair) and `in_chans` = 3.

    Args:
        model (`transformers.CLIPModel | transformers.CLIPVisionModelWithProjection`): the network; a whole CLIP also
            embeds text (`text_embeddings`).
        processor (`transformers.CLIPImageProcessor`, *optional*): the checkpoint's image processor; None: the
            library's defaults at the model's image size.
        tokenizer (*optional*): the checkpoint's tokenizer, for `text_embeddings`.
    """

    predicts = "embedding"
    in_chans = 3

    def __init__(
        self,
        model: transformers.CLIPModel | transformers.CLIPVisionModelWithProjection,
        processor: transformers.CLIPImageProcessor | None = None,
        tokenizer=None,
    ) -> None:
        super().__init__()
        if not isinstance(model, tuple(CLIP_MODEL_TYPES.values())):
            raise ValueError(
                f"Expected `model` to be a transformers CLIPModel or CLIPVisionModelWithProjection, but got "
                f"{type(model).__name__}."
            )
        self.model = model
        vision_config = getattr(model.config, "vision_config", model.config)
        if processor is None:
            side = vision_config.image_size
            processor = transformers.CLIPImageProcessor(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side}
            )
        self.processor = processor
        self.tokenizer = tokenizer
        # The processor resizes the shortest edge (CLIP's own) or to a fixed height and width, then crops if told to.
        self.shortest_edge = processor.size["shortest_edge"]
        self.resize_to = None if self.shortest_edge else (processor.size["height"], processor.size["width"])
        crop = processor.crop_size if processor.do_center_crop else None
        self.crop_size = None if crop is None else (crop["height"], crop["width"])
        self.register_buffer("image_mean", torch.tensor(processor.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(processor.image_std).view(1, -1, 1, 1), persistent=False)
        self.embedding_dim = model.config.projection_dim
        # A vision tower saved alone carries no temperature: scale 1, the bare cosine.
        self.logit_scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 1.0

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """`CLIPImageProcessor`'s steps on (B, 3, H, W) images in [-1, 1], differentiable: resize, crop, normalise."""
        height, width = images.shape[-2:]
        size = self.resize_to
        if size is None:
            short, long = min(height, width), max(height, width)
            resized_long = int(self.shortest_edge * long / short)  # the processor's rounding of the long side
            size = (self.shortest_edge, resized_long) if height <= width else (resized_long, self.shortest_edge)
        pixels = (images + 1) / 2
        if size != (height, width):
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
        if self.crop_size is not None:
            top, left = ((side - crop) // 2 for side, crop in zip(size, self.crop_size))
            pixels = pixels[..., top : top + self.crop_size[0], left : left + self.crop_size[1]]
        return (pixels - self.image_mean) / self.image_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm image embeddings of (B, 3, H, W) images in [-1, 1]."""
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"CLIP embeds (B, 3, H, W) RGB images in [-1, 1], but got images of shape {tuple(images.shape)}."
            )
        pixels = self.preprocess(images).to(self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: str | list[str]) -> torch.Tensor:
        """(len(prompts), D) unit-norm text embeddings of `prompts`: the targets of guidance toward a prompt."""
        if not hasattr(self.model, "text_model"):
            raise ValueError(
                f"Text targets need a whole CLIPModel, but this embedder holds {type(self.model).__name__}, an image "
                "tower only; embed reference images instead (`models.embed_images`)."
            )
        if self.tokenizer is None:
            raise ValueError("Text targets need the checkpoint's tokenizer, but none was saved with this CLIP model.")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.image_mean.device)
        text = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        return F.normalize(self.model.text_projection(text.pooler_output).float(), dim=-1)

    def save_pretrained(self, directory: str) -> None:
        """The checkpoint's own files: the model's config.json and weights, the preprocessor config and the tokenizer."""
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)


def is_clip_config(config: dict) -> bool:
    """Whether a config.json is a transformers CLIP checkpoint's (whole model or image tower)."""
    return config.get("model_type") in CLIP_MODEL_TYPES


def load_clip_embedder(path: str, setting: str = "classifier") -> CLIPImageEmbedder:
    """A `CLIPImageEmbedder` of a CLIP checkpoint folder or hub id (e.g. openai/clip-vit-base-patch32), with its
    preprocessor config and tokenizer where the checkpoint has them."""
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        model_class = CLIP_MODEL_TYPES.get(config.model_type)
        if model_class is None:
            raise ValueError(f"its config names model_type {config.model_type!r}, not one of {list(CLIP_MODEL_TYPES)}")
        model = model_class.from_pretrained(path)
    except (OSError, ValueError) as error:
        where = "folder" if os.path.isdir(path) else "hub id (network access needed)"
        raise OSError(f"`{setting}`={path!r} could not be loaded as a CLIP {where}: {error}") from error
    try:
        processor = transformers.CLIPImageProcessor.from_pretrained(path)
    except OSError:  # a checkpoint saved without one: the library's defaults at the model's size
        processor = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path) if model_class is transformers.CLIPModel else None
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return CLIPImageEmbedder(model, processor, tokenizer)
