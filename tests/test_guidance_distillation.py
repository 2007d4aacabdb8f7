"""Gradient guidance distilled into a one-pass ShiftGuide, and its halving stages, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from plugguide.models import MultiExpertModel, ShiftGuide, TimmClassifier, load_shift_guide
from plugguide.modules import GuidanceDistillation, GuidanceHalving
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import (
    CalibratedEDMGuidance,
    CalibratedGuidance,
    DistilledGuidance,
    ExpertGuidance,
)
from tests.conftest import TINY_RESNET, tiny_scheduler, tiny_unet


def random_shift_guide(channels: int = 1, sample_size: int = 16) -> ShiftGuide:
    """A ShiftGuide for the tiny UNet whose output convolution is random (a fresh one is a no-op)."""
    torch.manual_seed(0)
    guide = ShiftGuide(sample_size, channels, 10, block_out_channels=(8, 16))
    torch.nn.init.normal_(guide.net.conv_out.weight, std=0.1)
    return guide.eval()


def quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_a_fresh_guide_is_a_no_op_and_a_saved_one_loads_bitwise(tmp_path):
    x, x0 = torch.randn(3, 1, 16, 16), torch.rand(3, 1, 16, 16) * 2 - 1
    t, y = torch.tensor([10, 500, 990]), torch.tensor([0, 4, 9])
    assert torch.equal(ShiftGuide(16, 1, 10, (8, 16))(x, x0, t, y, 4.0), torch.zeros_like(x))
    guide = random_shift_guide()
    guide.save_pretrained(tmp_path / "g")
    loaded = load_shift_guide(str(tmp_path / "g"))
    assert torch.equal(guide(x, x0, t, y, 4.0), loaded(x, x0, t, y, 4.0))
    assert not torch.equal(guide(x, x0, t, y, 4.0), guide(x, x0, t, y, 2.0))  # the scale is an input
    with pytest.raises(ValueError, match="block_out_channels"):
        ShiftGuide(16, 1, 10, (12,))


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DDPMScheduler])
def test_pipeline_adds_the_guides_shift_to_eps_at_every_step(scheduler_class):
    """eps' = eps + G(x_t, clip(x0_hat), s; t, y), stepped by the stock scheduler, on DDIM and on ancestral DDPM alike."""
    unet, guide = tiny_unet().eval(), random_shift_guide()
    scheduler = scheduler_class.from_config(tiny_scheduler().config, clip_sample=False)
    pipeline = quiet(GuidedDiffusionPipeline(unet, scheduler, DistilledGuidance(guide)))
    labels, scale = torch.tensor([1, 7]), 3.0
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 16, generator=generator)
    reference = scheduler_class.from_config(scheduler.config)
    reference.set_timesteps(4)
    with torch.no_grad():
        for t in reference.timesteps:
            eps = unet(x, t).sample
            abar = reference.alphas_cumprod[t]
            x0_hat = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
            eps = eps + guide(x, x0_hat, t, labels, scale)
            x = reference.step(eps, t, x, generator=generator).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1)
    output = pipeline(
        labels,
        num_inference_steps=4,
        classifier_scale=scale,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    torch.testing.assert_close(output.images, expected, rtol=0, atol=1e-5)


def test_a_distilled_guide_refuses_targets_it_does_not_know():
    pipeline = quiet(GuidedDiffusionPipeline(tiny_unet(), tiny_scheduler(), DistilledGuidance(random_shift_guide())))
    with pytest.raises(ValueError, match="knows classes 0..9"):
        pipeline([3, 10], num_inference_steps=2, classifier_scale=1.0)


def experts_teacher(tmp_path) -> str:
    torch.manual_seed(0)
    path = str(tmp_path / "experts")
    MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=2, lora_rank=2).save_pretrained(path)
    return path


def tiny_distillation(tiny_assets, tmp_path, **settings) -> GuidanceDistillation:
    return GuidanceDistillation(
        ExpertGuidance(experts_teacher(tmp_path)),
        diffusion_model=tiny_assets["ddpm-uncond"],
        block_out_channels=(8, 16),
        num_inference_steps=4,
        **settings,
    )


def test_the_distillation_target_is_the_teachers_score_shift(tiny_assets, tmp_path):
    """The guide regresses -s sigma_t grad log p(y | x_t), the shift the pipeline applies with the teacher itself."""
    module = tiny_distillation(tiny_assets, tmp_path)
    z_t, t = torch.randn(2, 1, 16, 16), torch.tensor([100, 800])
    y, s = torch.tensor([2, 5]), torch.tensor([1.0, 3.0])
    _, x0_hat = module.predict_noise(z_t, t)
    grad = module.teacher.gradient(z_t, t, x0_hat, y)
    sigma = (1 - module.noise_scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(module.teacher_shift(z_t, x0_hat, t, y, s), -s.view(-1, 1, 1, 1) * sigma * grad)


def test_distillation_fits_the_teachers_shift_and_exports_the_guide(tiny_assets, tmp_path):
    """Steps on one draw fit the teacher's shift there; the export loads back as the same guide."""
    module = tiny_distillation(tiny_assets, tmp_path)
    optimizer = torch.optim.Adam(module.guide.parameters(), lr=1e-3)
    x0 = torch.rand(16, 1, 16, 16) * 2 - 1
    losses = []
    for _ in range(40):
        loss = module._loss(x0, torch.Generator().manual_seed(0))  # one fixed draw of (t, y, s, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    module.export(str(tmp_path / "guides"))
    loaded = load_shift_guide(str(tmp_path / "guides" / "shift" / "steps-4"))
    z_t, t, y, s = torch.randn(4, 1, 16, 16), torch.tensor([50, 300, 600, 900]), torch.tensor([1, 2, 3, 4]), 2.0
    _, x0_hat = module.predict_noise(z_t, t)
    assert torch.equal(loaded(z_t, x0_hat, t, y, s), module.guide(z_t, x0_hat, t, y, s))


@pytest.mark.parametrize(
    "teacher, message",
    [
        (lambda c: CalibratedEDMGuidance(c), "displaces the sample"),
        (lambda c: CalibratedGuidance(c, schedule="edm_continuous"), "schedule"),
        (lambda c: DistilledGuidance(random_shift_guide()), "already a distilled guide"),
    ],
)
def test_teachers_whose_shift_a_guide_cannot_learn_are_refused(tiny_assets, tiny_classifier, teacher, message):
    with pytest.raises(ValueError, match=f"`model.guidance`.*{message}|{message}"):
        GuidanceDistillation(teacher(tiny_classifier), diffusion_model=tiny_assets["ddpm-uncond"])


def test_halving_starts_from_the_exported_guide_and_learns_to_take_two_steps_in_one(tiny_assets, tmp_path):
    module = tiny_distillation(tiny_assets, tmp_path)
    torch.nn.init.normal_(module.guide.net.conv_out.weight, std=0.05)
    module.export(str(tmp_path / "guides"))
    with pytest.raises(FileNotFoundError, match="model.guide_root"):
        GuidanceHalving(str(tmp_path / "guides"), teacher_steps=8, diffusion_model=tiny_assets["ddpm-uncond"])
    with pytest.raises(ValueError, match="model.num_classes"):
        GuidanceHalving(str(tmp_path / "guides"), 4, tiny_assets["ddpm-uncond"], num_classes=5)
    halving = GuidanceHalving(str(tmp_path / "guides"), teacher_steps=4, diffusion_model=tiny_assets["ddpm-uncond"])
    assert halving.student_timesteps.tolist() == [500, 0] and halving.num_inference_steps == 2
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(
        halving.guide(x, x, torch.tensor([5, 5]), torch.tensor([1, 1]), 2.0),
        halving.teacher(x, x, torch.tensor([5, 5]), torch.tensor([1, 1]), 2.0),
    )
    optimizer = torch.optim.Adam(halving.guide.parameters(), lr=3e-3)
    x0 = torch.rand(16, 1, 16, 16) * 2 - 1
    losses = []
    for step in range(30):
        loss = halving._loss(x0, torch.Generator().manual_seed(step % 3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    assert all(p.grad is None for p in halving.teacher.parameters())
    halving.export(str(tmp_path / "halved"))
    assert (tmp_path / "halved" / "shift" / "steps-2" / "model.safetensors").is_file()
