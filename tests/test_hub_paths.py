"""The hub configs' code paths, run on tiny random models of the same classes saved to a temp dir and loaded by path."""

from __future__ import annotations

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from tests.conftest import (
    TINY_AUTOENCODER,
    TINY_SYNTHESIS,
    TINY_UNET,
    hub_style_classifier,
    tiny_conditional_unet,
    tiny_imagenet_overrides,
)
from tests.test_cli import run, sampling_overrides


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> dict[str, str]:
    """A tiny 32x32x3 `UNet2DModel` + linear DDPM schedule (the classes of google/ddpm-cifar10-32), a tiny
    3-channel timm ResNet teacher and ViT evaluator with hub-style input normalisation, and a labelled set."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET | dict(sample_size=32, in_channels=3, out_channels=3))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")).save_pretrained(
        str(root / "ddpm-cifar10-32")
    )
    hub_style_classifier("resnet18", 10, layers=[1, 1, 1, 1], channels=[8, 8, 16, 16], stem_width=8).save_pretrained(
        str(root / "resnet18_cifar10")
    )
    hub_style_classifier(
        "vit_tiny_patch16_224", 10, embed_dim=16, depth=1, num_heads=2, img_size=32, patch_size=8
    ).save_pretrained(str(root / "vit_cifar10"))
    images = [
        PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(40)
    ]
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"img": images[:30], "label": [i % 10 for i in range(30)]}),
        test=datasets.Dataset.from_dict({"img": images[30:], "label": list(range(10))}),
    ).cast_column("img", datasets.Image()).save_to_disk(str(root / "cifar10"))
    return {name: str(root / name) for name in ("ddpm-cifar10-32", "resnet18_cifar10", "vit_cifar10", "cifar10")}


def test_ppap_cifar10_config_runs_on_tiny_models_of_the_same_classes(cifar_like, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = {
        "trainer": {
            "max_steps": 5,
            "check_val_every_n_epoch": 1,
            "limit_val_batches": 1,
            "limit_test_batches": 1,
            "enable_progress_bar": False,
        },
        "model": {
            "init_args": {
                "teacher_path": cifar_like["resnet18_cifar10"],
                "diffusion_model": cifar_like["ddpm-cifar10-32"],
                "evaluator_path": cifar_like["vit_cifar10"],
                "num_inference_steps": 2,
                "lora_rank": 2,
            }
        },
        "data": {
            "init_args": {
                **TINY_SYNTHESIS,
                "labelled_data": {
                    "class_path": "plugguide.datamodules.ImageDataModule",
                    "init_args": {
                        "source": cifar_like["cifar10"],
                        "image_column": "img",
                        "image_size": 32,
                        "channels": 3,
                        "batch_size": 5,
                    },
                },
            }
        },
    }
    configs = ["ppap.yaml", "hub/ppap_cifar10.yaml"]
    run("fit", configs, overrides, tmp_path)
    assert (tmp_path / "runs/ppap-cifar10/version_0/experts/experts.json").is_file()
    run("test", configs, overrides, tmp_path, "--ckpt_path", "last")


def test_ppap_imagenet256_config_runs_on_tiny_models_of_the_same_classes(imagenet_like, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = tiny_imagenet_overrides(imagenet_like["adm"], imagenet_like)
    configs = ["ppap.yaml", "hub/ppap_imagenet256.yaml"]
    run("fit", configs, overrides, tmp_path)
    experts = json.loads((tmp_path / "runs/ppap-imagenet256/version_0/experts/experts.json").read_text())
    assert experts["num_experts"] == 5 and len(experts["timestep_boundaries"]) == 6
    run("test", configs, overrides, tmp_path, "--ckpt_path", "last")


def test_latent_sampling_job_decodes_through_a_vae(tmp_path, monkeypatch, tiny_assets):
    """The calibrated_latent.yaml code path: a latent class-conditional denoiser + AutoencoderKL, loaded by path."""
    from diffusers import AutoencoderKL

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_AUTOENCODER | dict(block_out_channels=(8, 8)))
    unet = tiny_conditional_unet(sample_size=8, in_channels=2, out_channels=2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "latent"))
    vae.save_pretrained(str(tmp_path / "latent" / "vae"))
    model = {
        "diffusion_model": str(tmp_path / "latent"),
        "vae": str(tmp_path / "latent"),
        "num_inference_steps": 2,
        "guidance_scale": 2.5,
        "classifier_scale": 1.0,
        "guidance": {
            "class_path": "plugguide.pipelines.guidance.CalibratedGuidance",
            "init_args": {"classifier": tiny_assets["classifier-resnet"]},
        },
        "evaluator_path": tiny_assets["evaluator"],
    }
    data = {"num_per_class": 1, "num_classes": 10, "batch_size": 10}
    overrides = sampling_overrides(tmp_path, model, data, precision="32-true")
    run("predict", ["sample.yaml", "hub/calibrated_latent.yaml"], overrides, tmp_path)
    assert np.load(tmp_path / "out/samples.npz")["images"].shape == (10, 1, 16, 16)  # decoded to pixels


def write_tiny_deepfloyd_if(path: str) -> None:
    """The classes of DeepFloyd-IF stage I, tiny and offline: a pixel-space text-conditional UNet2DConditionModel (3 -> 6
    channels, learned-range variance, simple cross-attention on T5 states, as diffusers' own IF tests build it), a T5
    encoder, a T5 tokenizer, and IF's DDPM schedule (cosine, dynamic thresholding)."""
    from diffusers import UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=32,
        layers_per_block=1,
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=6,
        norm_num_groups=4,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32,
        encoder_hid_dim=32,
        attention_head_dim=4,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    ).save_pretrained(f"{path}/unet")
    DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.5,
        variance_type="learned_range",
    ).save_pretrained(f"{path}/scheduler")
    T5EncoderModel(T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        f"{path}/text_encoder"
    )
    pieces = (
        [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
        + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz"]
        + [("\u2581", -1.0)]
    )
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    ).save_pretrained(f"{path}/tokenizer")


@pytest.fixture(scope="module")
def deepfloyd_like(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("deepfloyd") / "IF-I")
    write_tiny_deepfloyd_if(path)
    return path


@pytest.mark.parametrize(
    "prompt, guidance_scale", [(None, 1.0), ("a red fish", 4.0)], ids=["empty-prompt", "cfg-on-a-prompt"]
)
def test_deepfloyd_if_samples_as_diffusers_if_pipeline(deepfloyd_like, prompt, guidance_scale):
    """Unguided, the text model under the empty prompt (and with CFG on a prompt) gives diffusers' IFPipeline's samples."""
    from diffusers import IFPipeline, UNet2DConditionModel

    from plugguide.models import load_text_encoder, prompt_conditioning
    from plugguide.pipelines import GuidedDiffusionPipeline

    unet, scheduler = (
        UNet2DConditionModel.from_pretrained(deepfloyd_like, subfolder="unet"),
        DDPMScheduler.from_pretrained(deepfloyd_like, subfolder="scheduler"),
    )
    encoder, tokenizer = load_text_encoder(deepfloyd_like)
    conditioning = prompt_conditioning(deepfloyd_like, unet, prompt)
    stock = IFPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    stock.set_progress_bar_config(disable=True)
    # IFPipeline runs CFG when guidance_scale > 1, as eps("") + g (eps(prompt) - eps("")); the same g here
    expected = stock(
        prompt=prompt or "",
        guidance_scale=guidance_scale,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    ours = GuidedDiffusionPipeline(unet, scheduler, **conditioning)
    ours.set_progress_bar_config(disable=True)
    images = ours(
        batch_size=1,
        num_inference_steps=3,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert abs(images - expected).max() < 1e-5


def test_ppap_deepfloyd_if_config_runs_on_tiny_models_of_the_same_classes(
    deepfloyd_like, imagenet_like, tmp_path, monkeypatch
):
    """configs/hub/ppap_deepfloyd_if.yaml: synthesis under the empty prompt, experts, guided grids and the guided test."""
    monkeypatch.chdir(tmp_path)
    overrides = tiny_imagenet_overrides(deepfloyd_like, imagenet_like)
    configs = ["ppap.yaml", "hub/ppap_deepfloyd_if.yaml"]
    run("fit", configs, overrides, tmp_path)
    assert (tmp_path / "runs/ppap-deepfloyd-if/version_0/experts/experts.json").is_file()
    run("test", configs, overrides, tmp_path, "--ckpt_path", "last")
