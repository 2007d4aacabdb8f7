"""Data: real labelled images and images synthesized by frozen diffusion models, as HF `datasets`."""

from plugguide.datamodules.digits import DigitsDataModule
from plugguide.datamodules.image_folder import ImageDataModule
from plugguide.datamodules.class_labels import ClassLabelDataModule
from plugguide.datamodules.synthesized import SynthesizedImageDataModule
from plugguide.datamodules.resumable_loader import ResumableDataLoader, ResumableSampler, step_generator
from plugguide.datamodules.captions import CaptionedImageDataModule
from plugguide.datamodules.transformed_digits import ThickDigitsDataModule


__all__ = ["CaptionedImageDataModule", "ThickDigitsDataModule", "ResumableDataLoader", "ResumableSampler", "step_generator", "SynthesizedImageDataModule", "ClassLabelDataModule", "DigitsDataModule", "ImageDataModule"]
