"""Data: real labelled images and images synthesized by frozen diffusion models, as HF `datasets`."""

from plugguide.datamodules.captions import CaptionedImageDataModule
from plugguide.datamodules.class_labels import ClassLabelDataModule
from plugguide.datamodules.digit_maps import DigitMapsDataModule
from plugguide.datamodules.digits import DigitsDataModule
from plugguide.datamodules.embedding_targets import EmbeddingTargetDataModule, reference_images
from plugguide.datamodules.image_folder import ImageDataModule
from plugguide.datamodules.resumable_loader import ResumableDataLoader, ResumableSampler
from plugguide.datamodules.synthesized import SynthesizedImageDataModule
from plugguide.datamodules.target_maps import TargetMapDataModule
from plugguide.datamodules.transformed_digits import ThickDigitsDataModule

__all__ = [
    "CaptionedImageDataModule",
    "DigitMapsDataModule",
    "EmbeddingTargetDataModule",
    "TargetMapDataModule",
    "ThickDigitsDataModule",
    "ResumableDataLoader",
    "ResumableSampler",
    "SynthesizedImageDataModule",
    "ClassLabelDataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "reference_images",
]
