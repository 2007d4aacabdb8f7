"""Tiny, seeded, randomly initialised models of the real classes, saved the way the real assets are."""

from __future__ import annotations

import datasets
import numpy as np
import PIL.Image
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
# A synthesized set small enough for a test: 8 images of 2 DDIM steps, in shards and batches of 4.
TINY_SYNTHESIS = dict(
    num_images=8,
    num_inference_steps=2,
    generation_batch_size=4,
    shard_size=4,
    batch_size=4,
    max_saturated_fraction=None,
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


def tiny_conditional_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """`TINY_UNET` as a class-conditional `UNet2DConditionModel` (10 classes + the null class), with `overrides`."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET | dict(mid_block_type="UNetMidBlock2D", num_class_embeds=11) | overrides)


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


def hub_style_classifier(model_name: str, num_classes: int, **model_kwargs) -> TimmClassifier:
    """A tiny 3-channel timm classifier of a hub class, at 32x32 with ImageNet input normalisation."""
    return TimmClassifier(
        model_name, num_classes=num_classes, in_chans=3, normalize_input=True, input_size=32, model_kwargs=model_kwargs
    )


@pytest.fixture(scope="session")
def imagenet_like(tmp_path_factory) -> dict[str, str]:
    """The classes of configs/hub/ppap_imagenet256.yaml, tiny: an ADM-style `UNet2DModel` that predicts its variance
    (6 output channels, learned-range DDPM schedule), a 1000-class timm ResNet-50-family teacher and ConvNeXt
    evaluator with hub-style normalisation, and a labelled set with a `validation` split."""
    root = tmp_path_factory.mktemp("imagenet")
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET | dict(sample_size=32, in_channels=3, out_channels=6))
    DDPMPipeline(
        unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range"),
    ).save_pretrained(str(root / "adm"))
    hub_style_classifier("resnet50", 1000, layers=[1, 1, 1, 1], channels=[4, 4, 8, 8], stem_width=8).save_pretrained(
        str(root / "resnet50")
    )
    hub_style_classifier("convnext_tiny", 1000, depths=[1, 1, 1, 1], dims=[8, 8, 16, 16]).save_pretrained(
        str(root / "convnext")
    )
    images = [
        PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)) for i in range(30)
    ]
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"image": images[:20], "label": [37 * i % 1000 for i in range(20)]}),
        validation=datasets.Dataset.from_dict({"image": images[20:], "label": [999 - i for i in range(10)]}),
    ).cast_column("image", datasets.Image()).save_to_disk(str(root / "imagenet-1k"))
    return {name: str(root / name) for name in ("adm", "resnet50", "convnext", "imagenet-1k")}


def tiny_imagenet_overrides(diffusion_model: str, imagenet_like: dict) -> dict:
    """A hub PPAP config shrunk to tiny models of the same classes: 5 steps, 8 synthesized images, tiny ImageNet."""
    return {
        "trainer": {"max_steps": 5, "limit_val_batches": 1, "limit_test_batches": 1, "enable_progress_bar": False},
        "model": {
            "init_args": {
                "diffusion_model": diffusion_model,
                "teacher_path": imagenet_like["resnet50"],
                "evaluator_path": imagenet_like["convnext"],
                "num_inference_steps": 3,
                "lora_rank": 2,
            }
        },
        "data": {
            "init_args": {
                **TINY_SYNTHESIS,
                "labelled_data": {
                    "init_args": {"source": imagenet_like["imagenet-1k"], "image_size": 32, "batch_size": 5}
                },
            }
        },
    }
