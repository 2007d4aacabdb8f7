"""The authors' parametrisations as options: loralib's conv LoRA, per-expert biases, the batch-normalised gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from plugguide.models import MultiExpertModel, TimmClassifier
from plugguide.models.loralib_conv import LoralibConv2d
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import Guidance
from plugguide.pipelines.guided_diffusion import step_mean, step_variance
from tests.conftest import TINY_DEIT, TINY_RESNET, tiny_scheduler, tiny_unet


def loralib_layers(experts: MultiExpertModel) -> list[LoralibConv2d]:
    return [module for module in experts.peft_model.modules() if isinstance(module, LoralibConv2d)]


def test_loralib_conv_is_the_authors_formula_and_merges_to_the_same_weights():
    """riiid/PPAP's LoraConv2d: conv2d(x, W + reshape(B A, W.shape) alpha / r), A (r k, in k), B (out k, r k)."""
    torch.manual_seed(0)
    experts = MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=2, lora_rank=4, conv_lora="loralib").eval()
    layers = loralib_layers(experts)
    assert layers  # every default ResNet target is a conv
    layer = layers[1]
    base = layer.get_base_layer()
    k, name = base.kernel_size[0], experts.expert_name(1)
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    assert A.shape == (4 * k, base.in_channels * k) and B.shape == (base.out_channels * k, 4 * k)
    with torch.no_grad():
        B.normal_()
    experts.set_expert(1)
    x = torch.randn(2, base.in_channels, 8, 8)
    reference = F.conv2d(x, base.weight + (B @ A).view(base.weight.shape) * 8.0 / 4, None, base.stride, base.padding)
    torch.testing.assert_close(layer(x), reference)
    weight = base.weight.clone()
    experts.merge_adapters(True)
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    experts.merge_adapters(False)
    torch.testing.assert_close(base.weight, weight, rtol=0, atol=1e-6)


def test_loralib_and_bias_experts_start_as_the_backbone_and_round_trip(tmp_path):
    torch.manual_seed(0)
    backbone = TimmClassifier(**TINY_DEIT).eval()
    images, timesteps = torch.randn(4, 1, 16, 16), torch.tensor([10, 400, 600, 990])
    experts = MultiExpertModel(backbone, num_experts=3, lora_rank=4, per_expert_biases=True).eval()
    torch.testing.assert_close(experts(images, timesteps), backbone(images))  # zero deltas: an exact no-op
    with torch.no_grad():
        for parameter in experts.expert_parameters(2):
            parameter.add_(0.1 * torch.randn_like(parameter))
    outputs = experts(images, timesteps)
    torch.testing.assert_close(outputs[:3], backbone(images)[:3])  # expert 2's biases move expert 2 (t = 990) only
    assert (outputs[3] - backbone(images)[3]).abs().max() > 1e-3
    experts.save_pretrained(str(tmp_path / "experts"))
    loaded = MultiExpertModel.from_pretrained(str(tmp_path / "experts"))
    torch.testing.assert_close(loaded(images, timesteps), outputs)
    assert all(torch.equal(a, b) for a, b in zip(loaded.frozen_backbone().parameters(), backbone.parameters()))
    experts.copy_expert(2, 0)
    torch.testing.assert_close(experts(images[3:], torch.tensor([10])), outputs[3:])


def test_per_expert_biases_are_the_ones_no_expert_part_holds():
    """DeiT: the MLP and patch-embedding biases; qkv/proj already carry LoRA biases, the norms and head are copies."""
    experts = MultiExpertModel(TimmClassifier(**TINY_DEIT), num_experts=2, lora_rank=4, per_expert_biases=True)
    names = set(experts.expert_biases)
    depth = len(experts.peft_model.get_base_model().model.blocks)
    assert names == {"model-patch_embed-proj"} | {f"model-blocks-{i}-mlp-fc{j}" for i in range(depth) for j in (1, 2)}
    shared_head = MultiExpertModel(
        TimmClassifier(**TINY_DEIT), num_experts=2, lora_rank=4, per_expert_biases=True, per_expert_head=False
    )
    assert set(shared_head.expert_biases) == names | {"model-head"}


def test_parameter_counts_at_the_papers_models():
    """ResNet-50 at rank 16: peft's conv LoRA 0.88M per expert, loralib's 1.41M; the authors' PPAP-5 (loralib, frozen
    head, per-expert BatchNorm) is the paper's 28.6% of the backbone. DeiT-S: 23,424 biases per expert stay shared."""
    resnet = TimmClassifier(model_name="resnet50", num_classes=1000, in_chans=3)

    def lora_count(experts: MultiExpertModel) -> int:
        return sum(
            p.numel() for key, p in experts.peft_model.named_parameters() if ".lora_" in key and "expert_0" in key
        )

    assert lora_count(MultiExpertModel(resnet, num_experts=1)) == 877_872
    authors = MultiExpertModel(resnet, num_experts=5, conv_lora="loralib", per_expert_head=False)
    assert lora_count(authors) == 1_410_352
    assert authors.parameter_report()["trainable_percent_of_backbone"] == pytest.approx(28.6, abs=0.05)
    deit = MultiExpertModel(
        TimmClassifier(model_name="deit_small_patch16_224", num_classes=1000, in_chans=3),
        num_experts=1,
        per_expert_biases=True,
    )
    assert sum(p.numel() for p in deit.expert_biases.parameters()) == 23_424


def test_bad_parametrisation_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="conv_lora"):
        MultiExpertModel(TimmClassifier(**TINY_RESNET), conv_lora="kernel")
    with pytest.raises(ValueError, match="per_expert_biases"):
        MultiExpertModel(TimmClassifier(**TINY_RESNET), finetune="full", per_expert_biases=True)


class QuadraticGuidance(Guidance):
    """log p = -c ||x - target||^2 / 2: a guide whose loss scale c the batch-normalised rule must cancel."""

    def __init__(self, c: float, normalize_gradient: bool) -> None:
        super().__init__()
        self.c, self.normalize_gradient = c, normalize_gradient

    def log_likelihood(self, inputs, timesteps, targets):
        return -self.c * (inputs - 0.5).pow(2).flatten(1).sum(1) / 2


def test_step_mean_is_the_mean_diffusers_ddpm_step_samples_around():
    scheduler = tiny_scheduler()
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[3])
    x_t, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    abar = scheduler.alphas_cumprod[t]
    x0_hat = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)  # DDPMScheduler clips x0 by default
    step = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mean = step - step_variance(scheduler, t) ** 0.5 * noise
    torch.testing.assert_close(step_mean(scheduler, t, x0_hat, x_t), mean, rtol=1e-4, atol=1e-5)


def test_batch_normalized_gradient_frees_the_scale_from_the_loss_magnitude():
    """The authors' rule: the same samples whatever the loss's scale c; the raw gradient's samples move with c."""
    unet, scheduler = tiny_unet(), tiny_scheduler()
    samples = {}
    for normalize in (False, True):
        for c in (1.0, 10.0):
            pipeline = GuidedDiffusionPipeline(unet, scheduler, QuadraticGuidance(c, normalize))
            pipeline.set_progress_bar_config(disable=True)
            samples[normalize, c] = pipeline(
                class_labels=[0, 1],
                num_inference_steps=4,
                classifier_scale=0.5,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images
    torch.testing.assert_close(samples[True, 1.0], samples[True, 10.0])
    assert (samples[False, 1.0] - samples[False, 10.0]).abs().max() > 1e-3
    ddim = GuidedDiffusionPipeline(unet, DDIMScheduler.from_config(scheduler.config), QuadraticGuidance(1.0, True))
    ddim.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="normalize_gradient"):
        ddim(class_labels=[0], num_inference_steps=2, classifier_scale=1.0, output_type="pt")
