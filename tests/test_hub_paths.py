"""The hub configs' code paths, run on tiny random models of the same classes saved to a temp dir and loaded by path."""

from __future__ import annotations

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from plugguide.models import TimmClassifier
from tests.test_cli import run


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> dict[str, str]:
    """A tiny 32x32x3 `UNet2DModel` + linear DDPM schedule (the classes of google/ddpm-cifar10-32), a tiny
    3-channel timm ResNet teacher and ViT evaluator with hub-style input normalisation, and a labelled set."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")).save_pretrained(str(root / "ddpm-cifar10-32"))
    TimmClassifier("resnet18", num_classes=10, in_chans=3, normalize_input=True, input_size=32, model_kwargs=dict(layers=[1, 1, 1, 1], channels=[8, 8, 16, 16], stem_width=8)).save_pretrained(str(root / "resnet18_cifar10"))
    TimmClassifier("vit_tiny_patch16_224", num_classes=10, in_chans=3, normalize_input=True, input_size=32, model_kwargs=dict(embed_dim=16, depth=1, num_heads=2, img_size=32, patch_size=8)).save_pretrained(str(root / "vit_cifar10"))
    images = [PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(40)]
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"img": images[:30], "label": [i % 10 for i in range(30)]}),
        test=datasets.Dataset.from_dict({"img": images[30:], "label": list(range(10))}),
    ).cast_column("img", datasets.Image()).save_to_disk(str(root / "cifar10"))
    return {name: str(root / name) for name in ("ddpm-cifar10-32", "resnet18_cifar10", "vit_cifar10", "cifar10")}


def test_ppap_cifar10_config_runs_on_tiny_models_of_the_same_classes(cifar_like, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = {
        "trainer": {"max_steps": 4, "check_val_every_n_epoch": 1, "limit_val_batches": 1, "limit_test_batches": 1, "enable_progress_bar": False},
        "model": {"init_args": {"teacher_path": cifar_like["resnet18_cifar10"], "diffusion_model": cifar_like["ddpm-cifar10-32"], "evaluator_path": cifar_like["vit_cifar10"], "num_inference_steps": 2, "lora_rank": 2}},
        "data": {"init_args": {
            "diffusion_model": cifar_like["ddpm-cifar10-32"], "teacher_path": cifar_like["resnet18_cifar10"], "num_images": 8, "num_inference_steps": 2,
            "generation_batch_size": 4, "shard_size": 4, "batch_size": 4,
            "labelled_data": {"class_path": "plugguide.datamodules.ImageDataModule", "init_args": {"source": cifar_like["cifar10"], "image_column": "img", "image_size": 32, "channels": 3, "batch_size": 5}},
        }},
    }
    configs = ["ppap.yaml", "hub/ppap_cifar10.yaml"]
    run("fit", configs, overrides, tmp_path)
    assert (tmp_path / "runs/ppap-cifar10/experts/experts.json").is_file()
    run("test", configs, overrides, tmp_path, "--ckpt_path", str(next((tmp_path / "runs/ppap-cifar10").rglob("last.ckpt"))))


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> dict[str, str]:
    """The classes of configs/hub/ppap_imagenet256.yaml, tiny: an ADM-style `UNet2DModel` that predicts its variance
    (6 output channels, learned-range DDPM schedule), a 1000-class timm ResNet-50-family teacher and ConvNeXt
    evaluator with hub-style normalisation, and a labelled set with a `validation` split."""
    root = tmp_path_factory.mktemp("imagenet")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=6, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range")).save_pretrained(str(root / "adm"))
    TimmClassifier("resnet50", num_classes=1000, in_chans=3, normalize_input=True, input_size=32, model_kwargs=dict(layers=[1, 1, 1, 1], channels=[4, 4, 8, 8], stem_width=8)).save_pretrained(str(root / "resnet50"))
    TimmClassifier("convnext_tiny", num_classes=1000, in_chans=3, normalize_input=True, input_size=32, model_kwargs=dict(depths=[1, 1, 1, 1], dims=[8, 8, 16, 16])).save_pretrained(str(root / "convnext"))
    images = [PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)) for i in range(30)]
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"image": images[:20], "label": [37 * i % 1000 for i in range(20)]}),
        validation=datasets.Dataset.from_dict({"image": images[20:], "label": [999 - i for i in range(10)]}),
    ).cast_column("image", datasets.Image()).save_to_disk(str(root / "imagenet-1k"))
    return {name: str(root / name) for name in ("adm", "resnet50", "convnext", "imagenet-1k")}


def test_ppap_imagenet256_config_runs_on_tiny_models_of_the_same_classes(imagenet_like, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = {"diffusion_model": imagenet_like["adm"], "teacher_path": imagenet_like["resnet50"]}
    overrides = {
        "trainer": {"max_steps": 4, "limit_val_batches": 1, "limit_test_batches": 1, "enable_progress_bar": False},
        "model": {"init_args": paths | {"evaluator_path": imagenet_like["convnext"], "num_inference_steps": 3, "lora_rank": 2}},
        "data": {"init_args": paths | {
            "num_images": 8, "num_inference_steps": 2, "generation_batch_size": 4, "shard_size": 4, "batch_size": 4,
            "labelled_data": {"init_args": {"source": imagenet_like["imagenet-1k"], "image_size": 32, "batch_size": 5}},
        }},
    }
    configs = ["ppap.yaml", "hub/ppap_imagenet256.yaml"]
    run("fit", configs, overrides, tmp_path)
    experts = json.loads((tmp_path / "runs/ppap-imagenet256/experts/experts.json").read_text())
    assert experts["num_experts"] == 5 and len(experts["timestep_boundaries"]) == 6
    run("test", configs, overrides, tmp_path, "--ckpt_path", str(next((tmp_path / "runs/ppap-imagenet256").rglob("last.ckpt"))))


def test_latent_sampling_job_decodes_through_a_vae(tmp_path, monkeypatch, tiny_assets):
    """The calibrated_latent.yaml code path: a latent class-conditional denoiser + AutoencoderKL, loaded by path."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=2, norm_num_groups=4, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D", layers_per_block=1, norm_num_groups=4, num_class_embeds=11)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "latent"))
    vae.save_pretrained(str(tmp_path / "latent" / "vae"))
    overrides = {
        "trainer": {"enable_progress_bar": False, "precision": "32-true", "callbacks": [{"class_path": "plugguide.callbacks.SampleWriter", "init_args": {"output_dir": str(tmp_path / "out")}}]},
        "model": {"init_args": {
            "diffusion_model": str(tmp_path / "latent"), "vae": str(tmp_path / "latent"), "num_inference_steps": 2, "cfg_scale": 1.5, "guidance_scale": 1.0,
            "guidance": {"class_path": "plugguide.pipelines.guidance.CalibratedGuidance", "init_args": {"classifier": tiny_assets["classifier-resnet"]}},
            "evaluator_path": tiny_assets["evaluator"],
        }},
        "data": {"init_args": {"num_per_class": 1, "num_classes": 10, "batch_size": 10}},
    }
    run("predict", ["sample.yaml", "hub/calibrated_latent.yaml"], overrides, tmp_path)
    assert np.load(tmp_path / "out/samples.npz")["images"].shape == (10, 1, 16, 16)  # decoded to pixels
