"""Halving chains stay on their grids: each stage's teacher is queried only where it sampled, and a halved guide
samples on exactly the timesteps it was halved on."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from plugguide.models import GridDDIMScheduler, TinyGuide, load_guide, load_shift_guide
from plugguide.models.grid_ddim import halved_grid
from plugguide.modules import GuidanceHalving, ProgressiveHalving
from plugguide.pipelines import GuidedDiffusionPipeline, GuideDistilledPipeline, guided
from plugguide.pipelines.guidance import DistilledGuidance
from plugguide.pipelines.model_family import ModelFamily
from tests.conftest import tiny_scheduler, tiny_unet
from tests.test_guidance_distillation import quiet, random_shift_guide
from tests.test_guide_distillation import digits_batch, tiny_class_unet


def leading_ddim(num_inference_steps: int) -> list[int]:
    scheduler = DDIMScheduler.from_config(tiny_scheduler().config)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps.tolist()


def test_grid_ddim_steps_to_the_grids_next_timestep_and_is_ddim_on_ddims_own_grid():
    config = tiny_scheduler().config
    grid = [868, 744, 620, 496, 372, 248, 124, 0]  # 16 -> 8 on T = 1000, not DDIM's own 8 steps
    scheduler = GridDDIMScheduler.from_config(config).use_grid(grid)
    scheduler.set_timesteps(8)
    assert scheduler.timesteps.tolist() == grid
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    abar = scheduler.alphas_cumprod
    for t, prev in ((868, 744), (124, 0)):  # DDIM's own step would go to t - 125
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)  # the tiny scheduler clips x0_hat
        expected = abar[prev].sqrt() * x0 + (1 - abar[prev]).sqrt() * eps
        torch.testing.assert_close(scheduler.step(eps, t, x).prev_sample, expected)
    x0 = ((x - (1 - abar[0]).sqrt() * eps) / abar[0].sqrt()).clamp(-1, 1)
    final = scheduler.final_alpha_cumprod
    torch.testing.assert_close(scheduler.step(eps, 0, x).prev_sample, final.sqrt() * x0 + (1 - final).sqrt() * eps)
    with pytest.raises(ValueError, match="`num_inference_steps`=4, but the scheduler's grid has 8"):
        scheduler.set_timesteps(num_inference_steps=4, timesteps=grid)
    with pytest.raises(ValueError, match="strictly within"):
        scheduler.set_timesteps(timesteps=[0, 500])
    own, stock = GridDDIMScheduler.from_config(config), DDIMScheduler.from_config(config)
    own.set_timesteps(timesteps=leading_ddim(8))
    stock.set_timesteps(8)
    for t in stock.timesteps:
        assert torch.equal(own.step(eps, t, x).prev_sample, stock.step(eps, t, x).prev_sample)


def record_timesteps(guide, method: str = "forward") -> set[int]:
    """The timesteps a guide is asked at from now on (its third argument: `ShiftGuide.forward`, `Guide.residuals`)."""
    seen: set[int] = set()
    original = getattr(guide, method)

    def recording(*args, **kwargs):
        seen.update(torch.as_tensor(args[2]).flatten().tolist())
        return original(*args, **kwargs)

    setattr(guide, method, recording)
    return seen


@pytest.fixture(scope="module")
def class_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ddpm-cond"))
    DDPMPipeline(unet=tiny_class_unet(), scheduler=tiny_scheduler()).save_pretrained(path)
    return path


def test_every_distilled_guidance_halving_stage_queries_its_teacher_on_the_previous_stages_sampler_grid(
    tiny_assets, tmp_path
):
    """32 -> 16 -> 8 -> 4 on T = 1000 (leading), where DDIM's own 16- and 8-step grids do not nest."""
    random_shift_guide().save_pretrained(str(tmp_path / "32" / "shift" / "steps-32"))
    sampler_grid, root = leading_ddim(32), tmp_path / "32"  # a first-stage guide samples on DDIM's own grid
    x0 = torch.rand(64, 1, 16, 16) * 2 - 1
    for teacher_steps in (32, 16, 8):
        stage = GuidanceHalving(
            str(root / "guides" if teacher_steps < 32 else root), teacher_steps, tiny_assets["ddpm-uncond"]
        )
        queried = record_timesteps(stage.teacher)
        with torch.no_grad():
            stage._loss({"image": x0}, torch.Generator().manual_seed(0))
        assert queried and queried <= set(sampler_grid), sorted(queried - set(sampler_grid))
        assert len(queried) > teacher_steps // 2  # the teacher steps twice: from t and from its midpoint
        assert stage.student_timesteps.tolist() == halved_grid(sampler_grid, "leading")
        root = tmp_path / str(teacher_steps // 2)
        stage.export(str(root / "guides"))
        halved = load_shift_guide(str(root / "guides" / "shift" / f"steps-{teacher_steps // 2}"))
        assert halved.timesteps == stage.student_timesteps.tolist()
        # The pipeline samples the halved guide on exactly that grid, from a plain DDIM scheduler.
        pipeline = quiet(
            GuidedDiffusionPipeline(
                tiny_unet().eval(), DDIMScheduler.from_config(tiny_scheduler().config), DistilledGuidance(halved)
            )
        )
        sampled = record_timesteps(halved)
        pipeline([1, 7], num_inference_steps=teacher_steps // 2, classifier_scale=4.0, output_type="pt")
        assert sorted(sampled, reverse=True) == halved.timesteps
        sampler_grid = halved.timesteps
    assert sampler_grid == [744, 496, 248, 0]  # DDIM's own 4 steps would be 750, 500, 250, 0


def test_a_halved_guide_refuses_timesteps_off_its_grid_and_samplers_other_than_ddim():
    guide = random_shift_guide()
    guide.timesteps = [868, 744, 620, 496, 372, 248, 124, 0]
    guidance = DistilledGuidance(guide)
    x = torch.randn(1, 1, 16, 16)
    family = ModelFamily(DDIMScheduler.from_config(tiny_scheduler().config))
    family.set_timesteps(8)
    level = family.noise_level(0, family.scheduler.timesteps[0])  # 875: DDIM's own grid
    with pytest.raises(ValueError, match=r"halved on the DDIM timesteps \[868, .*timestep 875.*GridDDIMScheduler"):
        guidance.predicted_shift(x, level, x, torch.tensor([1]), 4.0)
    pipeline = quiet(
        GuidedDiffusionPipeline(tiny_unet().eval(), DDPMScheduler.from_config(tiny_scheduler().config), guidance)
    )
    with pytest.raises(ValueError, match="halved for DDIM .* `scheduler` DDPMScheduler cannot sample it"):
        pipeline([1], num_inference_steps=8, classifier_scale=4.0)


def test_every_cfg_guide_halving_stage_queries_its_teacher_on_the_previous_stages_sampler_grid(class_model, tmp_path):
    unet = tiny_class_unet()
    teacher = TinyGuide(unet, hidden_dim=16)
    torch.nn.init.normal_(teacher.out.weight, std=0.01)
    teacher.save_pretrained(str(tmp_path / "32" / "tiny" / "steps-32"))
    sampler_grid = leading_ddim(32)
    for teacher_steps in (32, 16, 8):
        stage = ProgressiveHalving(str(tmp_path / str(teacher_steps)), "tiny", teacher_steps, class_model)
        queried = record_timesteps(stage.teacher, "residuals")
        with torch.no_grad():
            stage._loss(digits_batch(32), torch.Generator().manual_seed(0))
        assert queried and queried <= set(sampler_grid), sorted(queried - set(sampler_grid))
        stage.export(str(tmp_path / str(teacher_steps // 2)))
        halved = load_guide(
            str(tmp_path / str(teacher_steps // 2) / "tiny" / f"steps-{teacher_steps // 2}"), stage.unet
        )
        assert halved.timesteps == stage.student_timesteps.tolist() == halved_grid(sampler_grid, "leading")
        pipeline = quiet(
            GuideDistilledPipeline(stage.unet, halved, DDIMScheduler.from_config(tiny_scheduler().config))
        )
        sampled = record_timesteps(halved, "residuals")
        pipeline(class_labels=[1, 2], num_inference_steps=teacher_steps // 2, guidance_scale=4.0, output_type="pt")
        assert sorted(sampled, reverse=True) == halved.timesteps
        sampler_grid = halved.timesteps


def test_a_halved_guide_steps_on_its_grid_inside_a_stock_pipeline():
    """`guided` puts a grid copy of the pipeline's DDIM scheduler in place for the block, and its own back after."""
    guide = random_shift_guide()
    guide.timesteps = [868, 744, 620, 496, 372, 248, 124, 0]
    pipe = DDIMPipeline(tiny_unet().eval(), DDIMScheduler.from_config(tiny_scheduler().config))
    pipe.set_progress_bar_config(disable=True)
    own = pipe.scheduler
    asked = record_timesteps(guide)
    with guided(pipe, DistilledGuidance(guide), classifier_scale=4.0, targets=[1, 7]):
        assert isinstance(pipe.scheduler, GridDDIMScheduler)
        pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="np")
    assert sorted(asked, reverse=True) == guide.timesteps and pipe.scheduler is own
