"""One loader for any off-the-shelf model a guidance method or PPAP's experts start from: classifier, dense model or
image embedder (CLIP's image tower, the digits' `ImageEmbedder`)."""

from __future__ import annotations

import json
import os
import re

import transformers
from torch import nn

from plugguide.models.classifier import load_classifier
from plugguide.models.clip_embedder import is_clip_config, load_clip_embedder
from plugguide.models.dense_model import load_dense_model
from plugguide.models.image_embedder import load_image_embedder

DENSE_HUB_PREFIXES = ("torchvision:", "transformers:")
HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_clip_hub_id(path: str) -> bool:
    """Whether `path` names a CLIP checkpoint on the hub (or in its cache), e.g. openai/clip-vit-base-patch32.

    Only an `owner/name` whose owner is not a local folder is looked up, so a mistyped local path (assets/digits/...)
    keeps the local loaders' error instead of a network round trip.
    """
    if not HUB_REPO_ID.match(path) or os.path.exists(path) or os.path.isdir(path.split("/")[0]):
        return False
    try:
        return is_clip_config(transformers.AutoConfig.from_pretrained(path).to_dict())
    except (OSError, ValueError):
        return False


def load_off_the_shelf(path: str, setting: str = "teacher_path") -> nn.Module:
    """A `TimmClassifier`, a `DenseModel`, a `CLIPImageEmbedder` or an `ImageEmbedder`, saved (told apart by their
    config.json: a dense model's names its `library`, an embedder's its `embedding_dim`, a CLIP checkpoint's its
    `model_type`) or from the hub (`hf-hub:` / `timm:` classifiers; `torchvision:` / `transformers:` dense models; a
    CLIP checkpoint by its id, e.g. openai/clip-vit-base-patch32)."""
    if path.startswith(DENSE_HUB_PREFIXES):
        return load_dense_model(path, setting)
    try:
        with open(os.path.join(path, "config.json")) as file:
            config = json.load(file)
    except (OSError, ValueError):  # missing or damaged: a hub id, or the classifier loader says what is wrong
        return load_clip_embedder(path, setting) if is_clip_hub_id(path) else load_classifier(path, setting)
    if is_clip_config(config):
        return load_clip_embedder(path, setting)
    if "embedding_dim" in config:
        return load_image_embedder(path, setting)
    return load_dense_model(path, setting) if "library" in config else load_classifier(path, setting)
