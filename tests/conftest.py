"""Tiny, seeded, randomly initialised models of the real classes, saved the way the real assets are."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from plugguide.models import DenseModel, TimmClassifier

torch.set_num_threads(1)

TINY_RESNET = dict(
    model_name="resnet18",
    num_classes=10,
    in_chans=1,
    model_kwargs=dict(layers=[1, 1, 1, 1], channels=[8, 8, 16, 16], stem_width=8),
)
TINY_DEIT = dict(
    model_name="deit_tiny_patch16_224",
    num_classes=10,
    in_chans=1,
    model_kwargs=dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2),
)
TINY_CONVNEXT = dict(
    model_name="convnext_atto",
    num_classes=10,
    in_chans=1,
    model_kwargs=dict(depths=[1, 1, 1, 1], dims=[8, 8, 16, 16], patch_size=1),
)
# The digits' dense models in miniature: an smp U-Net with a timm ResNet encoder, 11 classes per pixel or one map.
TINY_UNET_ENCODER = dict(
    encoder_name="tu-resnet18",
    encoder_depth=3,
    decoder_channels=[16, 8, 8],
    layers=[1, 1, 1, 1],
    channels=[8, 8, 16, 16],
)
TINY_SEGMENTER = dict(library="smp", architecture="Unet", num_classes=11, in_chans=1, model_kwargs=TINY_UNET_ENCODER)
TINY_DEPTH = dict(library="smp", architecture="Unet", num_classes=None, in_chans=1, model_kwargs=TINY_UNET_ENCODER)
TINY_AUTOENCODER = dict(
    in_channels=1,
    out_channels=1,
    sample_size=16,
    block_out_channels=(4, 8),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=2,
    norm_num_groups=4,
)
TINY_UNET = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
)


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET)


def tiny_conditional_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=11,
    )


def tiny_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def learned_variance_model() -> tuple[UNet2DModel, DDPMScheduler]:
    """An ADM-style UNet that predicts its variance (2C outputs) with a learned-range DDPM schedule."""
    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET | dict(out_channels=2)), DDPMScheduler(
        num_train_timesteps=1000, variance_type="learned_range"
    )


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, str]:
    """Paths of tiny models saved like assets/digits/: diffusers pipeline dirs, TimmClassifier and DenseModel dirs."""
    root = tmp_path_factory.mktemp("assets")
    paths = {}
    for name, unet in (("ddpm-uncond", tiny_unet()), ("ddpm-cond", tiny_conditional_unet())):
        paths[name] = str(root / name)
        DDPMPipeline(unet=unet, scheduler=tiny_scheduler()).save_pretrained(paths[name])
    for name, spec in (
        ("classifier-resnet", TINY_RESNET),
        ("classifier-deit", TINY_DEIT),
        ("evaluator", TINY_CONVNEXT),
    ):
        torch.manual_seed(0)
        paths[name] = str(root / name)
        TimmClassifier(**spec).save_pretrained(paths[name])
    for name, spec in (("segmenter", TINY_SEGMENTER), ("depth", TINY_DEPTH)):
        torch.manual_seed(0)
        paths[name] = str(root / name)
        DenseModel(**spec).save_pretrained(paths[name])
    torch.manual_seed(0)
    paths["autoencoder"] = str(root / "autoencoder")
    AutoencoderKL(**TINY_AUTOENCODER).save_pretrained(paths["autoencoder"])
    return paths


@pytest.fixture
def tiny_classifier() -> TimmClassifier:
    torch.manual_seed(0)
    return TimmClassifier(**TINY_RESNET)
