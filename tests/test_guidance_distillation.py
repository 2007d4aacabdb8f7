"""Gradient guidance distilled into a one-pass ShiftGuide, and its halving stages, on tiny random models."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

from plugguide.callbacks import GuidedSampleGrid
from plugguide.models import (
    MultiExpertModel,
    ShiftGuide,
    TimmClassifier,
    load_classifier,
    load_scheduler,
    load_shift_guide,
    load_unet,
)
from plugguide.modules import GuidanceDistillation, GuidanceHalving, GuidedSampling
from plugguide.pipelines import GuidedDiffusionPipeline, guided
from plugguide.pipelines.guidance import (
    CalibratedEDMGuidance,
    CalibratedGuidance,
    DistilledGuidance,
    ExpertGuidance,
)
from plugguide.pipelines.guidance.distilled import describe_teacher
from tests.conftest import TINY_RESNET, TINY_SYNTHESIS, TINY_UNET, tiny_imagenet_overrides, tiny_scheduler, tiny_unet
from tests.test_cli import CONFIGS, run
from tests.test_guide_distillation import text_model  # noqa: F401 (a fixture)


def random_shift_guide(channels: int = 1, sample_size: int = 16, **settings) -> ShiftGuide:
    """A ShiftGuide for the tiny UNet whose output convolution is random (a fresh one is a no-op)."""
    torch.manual_seed(0)
    guide = ShiftGuide(sample_size, channels, 10, block_out_channels=(8, 16), **settings)
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
    with pytest.raises(ValueError, match="built for samples of 1 channels"):
        guide(torch.randn(3, 4, 16, 16), x0, t, y, 4.0)


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


def test_a_distilled_guide_refuses_targets_it_does_not_know_and_the_normalised_cfg_rule():
    pipeline = quiet(GuidedDiffusionPipeline(tiny_unet(), tiny_scheduler(), DistilledGuidance(random_shift_guide())))
    with pytest.raises(ValueError, match="knows classes 0..9"):
        pipeline([3, 10], num_inference_steps=2, classifier_scale=1.0)
    with pytest.raises(ValueError, match="cfg_guidance"):
        GuidedDiffusionPipeline(tiny_unet(), tiny_scheduler(), pipeline.guidance, cfg_guidance="normalized")


def test_a_saved_guide_keeps_its_scale_range_and_teacher_and_one_saved_without_them_still_loads(tmp_path):
    teacher = {"class_path": "plugguide.pipelines.guidance.ExpertGuidance", "source": "experts", "settings": {}}
    ShiftGuide(16, 1, 10, (8, 16), scale_range=(1.0, 10.0), distilled_from=teacher).save_pretrained(tmp_path / "g")
    loaded = load_shift_guide(str(tmp_path / "g"))
    assert loaded.scale_range == (1.0, 10.0) and loaded.distilled_from == teacher
    config_path = tmp_path / "g" / "config.json"
    config = json.loads(config_path.read_text())
    del config["scale_range"], config["distilled_from"]  # as a guide saved before they were recorded
    config_path.write_text(json.dumps(config))
    old = load_shift_guide(str(tmp_path / "g"))
    assert old.scale_range is None and old.distilled_from is None
    with pytest.warns(UserWarning, match="no trained `scale_range`"):
        DistilledGuidance(old)
    with pytest.raises(ValueError, match="`scale_range`"):
        ShiftGuide(16, 1, 10, (8, 16), scale_range=(10.0, 1.0))


def test_a_distilled_guide_refuses_a_scale_outside_its_trained_range_before_the_first_step():
    """In the pipeline, in a stock pipeline (`guided`) and in the sampling job's config, naming the setting."""
    guidance = DistilledGuidance(random_shift_guide(scale_range=(2.0, 5.0)))
    unet = tiny_unet().eval()
    denoiser_calls = []
    unet.register_forward_hook(lambda *_: denoiser_calls.append(1))
    pipeline = quiet(GuidedDiffusionPipeline(unet, tiny_scheduler(), guidance))
    for scale in (1.0, 6.0):
        with pytest.raises(ValueError, match=rf"`classifier_scale`={scale} is outside .* \[2, 5\]"):
            pipeline([1, 7], num_inference_steps=2, classifier_scale=scale)
    assert not denoiser_calls  # checked once, before sampling
    pipeline([1, 7], num_inference_steps=2, classifier_scale=5.0)  # the range holds its ends
    pipeline([1, 7], num_inference_steps=2, classifier_scale=0.0)  # unguided: the guide is not asked
    stock = DDIMPipeline(unet, DDIMScheduler.from_config(tiny_scheduler().config))
    with pytest.raises(ValueError, match=r"`classifier_scale`=8.0 is outside"):
        with guided(stock, guidance, classifier_scale=8.0, targets=[1, 7]):
            pass
    with pytest.raises(ValueError, match=r"`model.classifier_scale`=8.0 is outside"):
        GuidedSampling(guidance=guidance, classifier_scale=8.0)


def test_a_guide_refuses_samples_of_another_size_than_it_was_built_for():
    guide, t, y = random_shift_guide(), torch.tensor([10, 500]), torch.tensor([0, 4])  # 1 channel at 16 x 16
    small = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"built for samples of 1 channels at 16x16 .* shape \(2, 1, 8, 8\)"):
        guide(small, small, t, y, 4.0)
    with pytest.raises(ValueError, match=r"x0_hat of shape \(2, 1, 8, 8\)"):
        guide(torch.randn(2, 1, 16, 16), small, t, y, 4.0)
    torch.manual_seed(0)
    denoiser = UNet2DModel(**TINY_UNET | dict(sample_size=8))  # a denoiser of smaller samples
    pipeline = quiet(GuidedDiffusionPipeline(denoiser, tiny_scheduler(), DistilledGuidance(guide)))
    with pytest.raises(ValueError, match="built for samples of 1 channels at 16x16"):
        pipeline([1, 7], num_inference_steps=2, classifier_scale=4.0)


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
        loss = module._loss({"image": x0}, torch.Generator().manual_seed(0))  # one fixed draw of (t, y, s, noise)
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
    trailing = GuidanceHalving(
        str(tmp_path / "guides"), 4, tiny_assets["ddpm-uncond"], scheduler_config={"timestep_spacing": "trailing"}
    )
    assert trailing.student_timesteps.tolist() == [999, 499]  # the first step starts from pure noise
    # Grids sample the student at its own step count, which no hyper-parameter names.
    assert GuidedSampleGrid.setting(None, halving, "num_inference_steps", 50) == 2
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(
        halving.guide(x, x, torch.tensor([5, 5]), torch.tensor([1, 1]), 2.0),
        halving.teacher(x, x, torch.tensor([5, 5]), torch.tensor([1, 1]), 2.0),
    )
    optimizer = torch.optim.Adam(halving.guide.parameters(), lr=3e-3)
    x0 = torch.rand(16, 1, 16, 16) * 2 - 1
    losses = []
    for step in range(30):
        loss = halving._loss({"image": x0}, torch.Generator().manual_seed(step % 3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    assert all(p.grad is None for p in halving.teacher.parameters())
    halving.export(str(tmp_path / "halved"))
    assert (tmp_path / "halved" / "shift" / "steps-2" / "model.safetensors").is_file()


def test_the_scale_range_and_the_teacher_travel_with_every_export(tiny_assets, tiny_classifier, tmp_path):
    """The first export and each halving stage's; a grid scale or a halving range outside them is refused."""
    with pytest.raises(ValueError, match=r"`model.classifier_scale`=12.0.*`model.scale_range`=\[1.0, 10.0\]"):
        tiny_distillation(tiny_assets, tmp_path, classifier_scale=12.0)
    module = tiny_distillation(tiny_assets, tmp_path, scale_range=(2.0, 8.0))
    module.export(str(tmp_path / "guides"))
    first = load_shift_guide(str(tmp_path / "guides" / "shift" / "steps-4"))
    assert first.scale_range == (2.0, 8.0)
    teacher = first.distilled_from
    assert teacher["class_path"] == "plugguide.pipelines.guidance.ppap_experts.ExpertGuidance"
    assert teacher["source"] == str(tmp_path / "experts")
    assert teacher["settings"]["input"] == "x_t" and teacher["settings"]["normalize_gradient"] is False
    assert teacher["settings"]["task"]["class"] == "ClassificationTask"
    with pytest.raises(ValueError, match=r"`model.scale_range`=\[1.0, 8.0\] reaches outside"):
        GuidanceHalving(str(tmp_path / "guides"), 4, tiny_assets["ddpm-uncond"], scale_range=(1.0, 8.0))
    halving = GuidanceHalving(str(tmp_path / "guides"), 4, tiny_assets["ddpm-uncond"], scale_range=(3.0, 6.0))
    halving.export(str(tmp_path / "guides"))
    halved = load_shift_guide(str(tmp_path / "guides" / "shift" / "steps-2"))
    assert halved.scale_range == (3.0, 6.0) and halved.distilled_from == teacher
    # A calibrated teacher is described by where its classifier came from and the settings that shape its shift.
    path = str(tmp_path / "classifier")
    tiny_classifier.save_pretrained(path)
    calibrated = describe_teacher(CalibratedGuidance(path, joint_temperature=2.0, softplus_beta=5.0))
    assert calibrated["source"] == path and calibrated["class_path"].endswith("CalibratedGuidance")
    assert calibrated["settings"]["joint_temperature"] == 2.0 and calibrated["settings"]["softplus_beta"] == 5.0


def tiny_job_overrides(tiny_assets, experts: str) -> dict:
    """The digits configs shrunk to the tiny models: 3 steps, 8 synthesized images, the tiny teacher experts."""
    return {
        "trainer": {
            "max_steps": 3,
            "check_val_every_n_epoch": 1,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
        },
        "model": {
            "init_args": {
                "diffusion_model": tiny_assets["ddpm-uncond"],
                "evaluator_path": tiny_assets["evaluator"],
            }
        },
        "data": {
            "init_args": {
                **TINY_SYNTHESIS,
                "teacher_path": tiny_assets["classifier-resnet"],
            }
        },
    }


def config_scale_range(*configs: str) -> list[float]:
    """`model.init_args.scale_range` of the config files, the last one that names it."""
    ranges = []
    for config in configs:
        with open(os.path.join(CONFIGS, config)) as file:
            ranges.append(yaml.safe_load(file)["model"]["init_args"].get("scale_range"))
    return [value for value in ranges if value is not None][-1]


def movement_by_guide(diffusion_model: str, guide: str, num_inference_steps: int) -> float:
    """max |guided - unguided| of DDIM samples at the same seed, the exported guide at the middle of its range.

    DDIM without clipping: a clipping sampler steps guided runs as its unclipped copy (`clip_first`), which moves
    samples even where the guide's shift is zero."""
    unet = load_unet(diffusion_model).eval()
    scheduler = load_scheduler(diffusion_model, "DDIMScheduler", overrides={"clip_sample": False})
    pipeline = quiet(GuidedDiffusionPipeline(unet, scheduler, DistilledGuidance(guide)))
    low, high = pipeline.guidance.guide.scale_range

    def sample(scale: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipeline(
            [1, 7],
            num_inference_steps=num_inference_steps,
            classifier_scale=scale,
            generator=generator,
            output_type="pt",
        ).images

    return (sample((low + high) / 2) - sample(0.0)).abs().max().item()


def test_guidance_distillation_and_halving_configs_run(tiny_assets, tmp_path, monkeypatch):
    """The real configs on tiny models: distil, then halve 32 -> 16 from the export the stage file names."""
    monkeypatch.chdir(tmp_path)
    overrides = tiny_job_overrides(tiny_assets, experts_teacher(tmp_path))
    overrides["model"]["init_args"] |= {
        "guidance": {"init_args": {"experts": str(tmp_path / "experts")}},
        "block_out_channels": [8, 16],
    }
    run("fit", "guidance_distillation.yaml", overrides, tmp_path)
    exported = str(tmp_path / "runs/guidance-distillation/version_0/guides/shift/steps-32")
    guide = load_shift_guide(exported)
    assert list(guide.scale_range) == config_scale_range("guidance_distillation.yaml")
    assert guide.distilled_from["class_path"].endswith("ExpertGuidance")
    assert guide.distilled_from["source"] == str(tmp_path / "experts")
    assert movement_by_guide(tiny_assets["ddpm-uncond"], exported, 32) > 1e-3
    halving_configs = ["guidance_halving/base.yaml", "guidance_halving/32to16.yaml"]
    run("fit", halving_configs, tiny_job_overrides(tiny_assets, ""), tmp_path)
    exported = str(tmp_path / "runs/guidance-halving/32to16/version_0/guides/shift/steps-16")
    halved = load_shift_guide(exported)
    assert halved.num_classes == 10
    assert list(halved.scale_range) == config_scale_range(*halving_configs)
    assert halved.distilled_from == guide.distilled_from
    assert movement_by_guide(tiny_assets["ddpm-uncond"], exported, 16) > 1e-3


def test_guidance_distillation_imagenet256_config_runs_on_tiny_models_of_the_same_classes(
    imagenet_like,
    tmp_path,
    monkeypatch,
):
    """ADM-style learned-variance UNet, 1000 classes, PPAP experts of the ResNet-50-family teacher."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    experts = str(tmp_path / "experts")
    MultiExpertModel(load_classifier(imagenet_like["resnet50"]), num_experts=5, lora_rank=2).save_pretrained(experts)
    overrides = {
        "trainer": {"max_steps": 2, "limit_val_batches": 1, "enable_progress_bar": False, "precision": "32-true"},
        "model": {
            "init_args": {
                "guidance": {"init_args": {"experts": experts}},
                "diffusion_model": imagenet_like["adm"],
                "evaluator_path": imagenet_like["convnext"],
                "block_out_channels": [8, 16],
                "num_inference_steps": 3,
            }
        },
        "data": tiny_imagenet_overrides(imagenet_like["adm"], imagenet_like)["data"]
        | {
            "init_args": tiny_imagenet_overrides(imagenet_like["adm"], imagenet_like)["data"]["init_args"]
            | {"teacher_path": imagenet_like["resnet50"]}
        },
    }
    run("fit", "hub/guidance_distillation_imagenet256.yaml", overrides, tmp_path)
    exported = str(tmp_path / "runs/guidance-distillation-imagenet256/version_0/guides/shift/steps-3")
    guide = load_shift_guide(exported)
    assert guide.num_classes == 1000 and guide.net.config.in_channels == 7  # x_t, x0_hat (3 each) and the scale map
    assert list(guide.scale_range) == config_scale_range("hub/guidance_distillation_imagenet256.yaml")
    assert guide.distilled_from["class_path"].endswith("ExpertGuidance") and guide.distilled_from["source"] == experts
    assert movement_by_guide(imagenet_like["adm"], exported, 3) > 1e-3


def test_guidance_distillation_sd15_config_runs_on_tiny_components(
    text_model,  # noqa: F811 (the fixture imported above)
    tiny_rgb_classifier,
    tmp_path,
    monkeypatch,
):
    """Latent, text-conditional UNet under the empty prompt; the teacher's gradient flows through the VAE decoder."""
    import datasets
    import numpy as np
    import PIL.Image

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(6)]
    datasets.Dataset.from_dict({"image": images, "text": ["a"] * 6}).save_to_disk("captions")
    overrides = {
        "trainer": {
            "max_steps": 2,
            "val_check_interval": 1.0,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "precision": "32-true",
        },
        "model": {
            "init_args": {
                "guidance": {"init_args": {"classifier": tiny_rgb_classifier}},
                "diffusion_model": text_model,
                "vae": text_model,
                "evaluator_path": None,
                "block_out_channels": [8, 16],
            }
        },
        "data": {
            "init_args": {
                "source": "captions",
                "image_size": 16,
                "batch_size": 2,
                "num_workers": 0,
                "val_fraction": 0.34,
            }
        },
    }
    run("fit", "hub/guidance_distillation_sd15.yaml", overrides, tmp_path)
    guide = load_shift_guide(str(tmp_path / "runs/guidance-distillation-sd15/version_0/guides/shift/steps-32"))
    assert guide.num_classes == 1000 and guide.net.config.sample_size == 8  # the latents' size, not the pixels'
    assert list(guide.scale_range) == config_scale_range("hub/guidance_distillation_sd15.yaml")
    teacher = guide.distilled_from
    assert teacher["class_path"].endswith("CalibratedGuidance") and teacher["source"] == tiny_rgb_classifier
    assert teacher["settings"]["input"] == "x0_hat" and teacher["settings"]["schedule"] == "ddpm"


@pytest.fixture
def tiny_rgb_classifier(tmp_path) -> str:
    torch.manual_seed(0)
    path = str(tmp_path / "resnet-rgb")
    TimmClassifier(**TINY_RESNET | dict(num_classes=1000, in_chans=3)).save_pretrained(path)
    return path


def test_the_distillation_target_of_a_batch_across_noise_ranges_is_each_experts_own_shift(tiny_assets, tmp_path):
    """The default teacher runs merged experts on a batch whose t spans every range: each sample's target is the
    shift its own expert gives it alone, unmerged, -s sigma_t grad (sigma_t from the schedule's abar)."""
    torch.manual_seed(0)
    experts = MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=4, lora_rank=2).eval()
    with torch.no_grad():
        for n in range(4):  # distinct experts: non-zero LoRA B, their own biases and norms
            for parameter in experts.expert_parameters(n):
                parameter.add_(0.3 * torch.randn_like(parameter))
    experts.save_pretrained(str(tmp_path / "experts"))
    module = GuidanceDistillation(
        ExpertGuidance(str(tmp_path / "experts")),
        diffusion_model=tiny_assets["ddpm-uncond"],
        block_out_channels=(8, 16),
    )
    assert module.teacher.classifier.merges_adapters
    z_t, t = torch.randn(8, 1, 16, 16), torch.tensor([900, 100, 600, 300, 50, 950, 450, 700])
    y, s = torch.arange(8) % 10, torch.linspace(1.0, 8.0, 8)
    _, x0_hat = module.predict_noise(z_t, t)
    shift = module.teacher_shift(z_t, x0_hat, t, y, s)
    alone = ExpertGuidance(experts)  # the same experts, unmerged, one sample (one range) at a time
    abar = DDPMScheduler.from_pretrained(tiny_assets["ddpm-uncond"], subfolder="scheduler").alphas_cumprod
    for i in range(8):
        grad = alone.gradient(z_t[i : i + 1], t[i : i + 1], x0_hat[i : i + 1], y[i : i + 1])
        expected = -s[i] * (1 - abar[t[i]]).sqrt() * grad
        torch.testing.assert_close(shift[i : i + 1], expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
