"""One loader for any off-the-shelf model a guidance method or PPAP's experts start from: classifier or dense model."""

from __future__ import annotations

import json
import os

from plugguide.models.classifier import TimmClassifier, load_classifier
from plugguide.models.dense_model import DenseModel, load_dense_model

DENSE_HUB_PREFIXES = ("torchvision:", "transformers:")


def load_off_the_shelf(path: str, setting: str = "teacher_path") -> TimmClassifier | DenseModel:
    """A `TimmClassifier` or a `DenseModel`, saved (told apart by the `library` a dense model's config.json names) or from
    the hub (`hf-hub:` / `timm:` classifiers; `torchvision:` / `transformers:` dense models)."""
    if path.startswith(DENSE_HUB_PREFIXES):
        return load_dense_model(path, setting)
    try:
        with open(os.path.join(path, "config.json")) as file:
            is_dense = "library" in json.load(file)
    except (OSError, ValueError):  # missing or damaged: the classifier loader says so, naming the setting
        is_dense = False
    return load_dense_model(path, setting) if is_dense else load_classifier(path, setting)
