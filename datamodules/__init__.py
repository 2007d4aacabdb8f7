"""Data: real labelled images and images synthesized by frozen diffusion models, as HF `datasets`."""

from plugguide.datamodules.digits import DigitsDataModule
from plugguide.datamodules.image_folder import ImageDataModule
from plugguide.datamodules.class_labels import ClassLabelDataModule
from plugguide.datamodules.synthesized import SynthesizedImageDataModule


__all__ = ["SynthesizedImageDataModule", "ClassLabelDataModule", "DigitsDataModule", "ImageDataModule"]
