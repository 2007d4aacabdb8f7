"""Guide models, CFG distillation, progressive halving and one-pass sampling, on seeded tiny components (CPU, seconds)."""

from __future__ import annotations

import json
import os
import sys
from unittest import mock

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)
from torch.utils.flop_counter import FlopCounterMode

from plugguide.models.guides import FullGuide, TinyGuide, load_guide, predict_guided_noise
from plugguide.modules.guide_distillation import GuideDistillation
from plugguide.modules.progressive_halving import ProgressiveHalving, ddim_step, halving_target
from plugguide.pipelines.guide_distilled import GuideDistilledPipeline
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline
from tests.conftest import tiny_conditional_unet

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def tiny_class_unet(seed: int = 0, widths=(8, 16)) -> UNet2DConditionModel:
    return tiny_conditional_unet(
        seed,
        sample_size=8,
        block_out_channels=widths,
        down_block_types=("DownBlock2D",) * len(widths),
        up_block_types=("UpBlock2D",) * len(widths),
    )


def tiny_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> str:
    """A tiny random class-conditional diffusers pipeline directory (unet/, scheduler/), like assets/digits/ddpm-cond."""
    path = str(tmp_path_factory.mktemp("ddpm-cond"))
    DDPMPipeline(unet=tiny_class_unet(), scheduler=tiny_scheduler()).save_pretrained(path)
    return path


def digits_batch(size: int = 8, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(size, 1, 8, 8, generator=generator) * 2 - 1,
        "label": torch.randint(0, 10, (size,), generator=generator),
    }


@pytest.mark.parametrize("guide_class", [TinyGuide, FullGuide])
def test_fresh_guide_is_exact_noop(guide_class):
    unet = tiny_class_unet().eval()
    guide = guide_class(unet)
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 250, 600, 999]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        plain = unet(x, t, None, class_labels=labels).sample
        steered = predict_guided_noise(unet, guide, x, t, torch.tensor([2.0, 4.0, 6.0, 9.0]), class_labels=labels)
    assert torch.equal(plain, steered)


@pytest.mark.parametrize("guide_class", [TinyGuide, FullGuide])
def test_guide_round_trips_and_refuses_another_unet(guide_class, tmp_path):
    unet = tiny_class_unet()
    guide = guide_class(unet)
    for parameter in guide.parameters():
        torch.nn.init.normal_(parameter.data, std=0.1)  # a "trained" guide, so that loading is seen to load
    guide.save_pretrained(str(tmp_path))
    loaded = load_guide(str(tmp_path), tiny_class_unet(seed=1))  # same architecture, other weights: plugs in
    x, t, g, labels = torch.randn(2, 1, 8, 8), torch.tensor([100, 700]), torch.tensor([3.0, 8.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.allclose(
            predict_guided_noise(unet, guide, x, t, g, labels), predict_guided_noise(unet, loaded, x, t, g, labels)
        )
    with pytest.raises(ValueError, match="built for a UNet"):
        load_guide(str(tmp_path), tiny_class_unet(widths=(8, 8)))
    with pytest.raises(ValueError, match="built for a UNet"):
        GuideDistilledPipeline(tiny_class_unet(widths=(8, 8)), guide, DDIMScheduler())


def test_a_guide_saved_before_the_hub_mixin_still_loads(tmp_path):
    """Guides written as config.json + model.safetensors by a plain `safetensors.save_file` (no model card) load."""
    import json

    from safetensors.torch import save_file

    guide = TinyGuide(tiny_class_unet(), hidden_dim=8)
    torch.nn.init.normal_(guide.out.weight, std=0.1)
    config = {"guide_class": "TinyGuide", "init_args": {"hidden_dim": 8}, "unet_signature": guide.signature}
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in guide.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = load_guide(str(tmp_path), tiny_class_unet())
    assert loaded.init_args == {"hidden_dim": 8} and torch.equal(loaded.out.weight, guide.out.weight)


def test_only_guide_parameters_receive_gradients(digits_model):
    module = GuideDistillation(guide=lambda unet: TinyGuide(unet, hidden_dim=16), diffusion_model=digits_model)
    # A fresh TinyGuide's zero output layer blocks gradients to its inner layers for one step; perturb it.
    torch.nn.init.normal_(module.guide.out.weight, std=0.01)
    module._loss(digits_batch(), torch.Generator().manual_seed(0)).backward()
    guide_ids = {id(p) for p in module.guide.parameters()}
    for name, parameter in module.named_parameters():
        if id(parameter) in guide_ids:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    optimizer = module.configure_optimizers()
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == guide_ids


@pytest.mark.parametrize(
    ("guide_factory", "ratio"),
    # A random UNet's CFG difference is mostly spatial noise that a per-channel TinyGuide cannot express, so
    # its reachable share is smaller than the ControlNet's.
    [(lambda unet: TinyGuide(unet, hidden_dim=32), 0.93), (lambda unet: FullGuide(unet), 0.8)],
)
def test_distillation_loss_falls_on_tiny_unet(digits_model, guide_factory, ratio):
    torch.manual_seed(0)
    module = GuideDistillation(
        guide=guide_factory, diffusion_model=digits_model, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3)
    )
    optimizer = module.configure_optimizers()
    batch = digits_batch(16)

    def loss() -> torch.Tensor:
        return module._loss(batch, torch.Generator().manual_seed(0))  # same noise, t and g each time

    with torch.no_grad():
        before = loss().item()
    for _ in range(50):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < ratio * before, (before, after)


def test_halving_target_is_the_teachers_two_step_result():
    """One DDIM step t -> s from x_target lands exactly on the teacher's z_s (algebra on random tensors)."""
    generator = torch.Generator().manual_seed(0)
    abar = torch.rand(3, generator=generator).sort(descending=False).values * 0.9 + 0.05  # abar_t < abar_t' < abar_s
    (alpha_t, alpha_mid, alpha_s), (sigma_t, sigma_mid, sigma_s) = abar.sqrt(), (1 - abar).sqrt()
    z_t = torch.randn(4, 1, 8, 8, generator=generator)
    eps_1, eps_2 = torch.randn(2, 4, 1, 8, 8, generator=generator)
    z_s = ddim_step(
        ddim_step(z_t, eps_1, alpha_t, sigma_t, alpha_mid, sigma_mid), eps_2, alpha_mid, sigma_mid, alpha_s, sigma_s
    )
    x_target = halving_target(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s)
    # A student whose x-prediction is x_target predicts eps = (z_t - alpha_t x) / sigma_t; its single step:
    eps_student = (z_t - alpha_t * x_target) / sigma_t
    assert torch.allclose(ddim_step(z_t, eps_student, alpha_t, sigma_t, alpha_s, sigma_s), z_s, atol=1e-5)
    # Last step (sigma_s = 0, alpha_s = 1): the target is the teacher's final sample.
    assert torch.allclose(halving_target(z_t, z_s, alpha_t, sigma_t, torch.tensor(1.0), torch.tensor(0.0)), z_s)


def test_halving_stage_trains_a_copy_of_the_teacher(digits_model, tmp_path):
    unet = tiny_class_unet()
    teacher = TinyGuide(unet, hidden_dim=16)
    torch.nn.init.normal_(teacher.out.weight, std=0.01)
    teacher.save_pretrained(str(tmp_path / "tiny" / "steps-8"))
    module = ProgressiveHalving(
        guide_root=str(tmp_path), guide_name="tiny", teacher_steps=8, diffusion_model=digits_model
    )
    assert module.num_inference_steps == 4 and module.student_timesteps.tolist() == [750, 500, 250, 0]
    loss = module._loss(digits_batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert module.guide.out.weight.grad.abs().sum() > 0
    module.export(str(tmp_path))
    assert os.path.isfile(tmp_path / "tiny" / "steps-4" / "model.safetensors")
    with pytest.raises(ValueError, match="`teacher_steps` to be an even number"):
        ProgressiveHalving(guide_root=str(tmp_path), teacher_steps=5, diffusion_model=digits_model)
    trailing = ProgressiveHalving(
        guide_root=str(tmp_path),
        teacher_steps=8,
        diffusion_model=digits_model,
        scheduler_config={"timestep_spacing": "trailing"},
    )
    assert trailing.student_timesteps.tolist() == [999, 749, 499, 249]  # the first step starts from pure noise


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_a_student_equal_to_its_teacher_has_zero_loss_at_the_last_step(set_alpha_to_one, tmp_path):
    """The last student step is the teacher's own last step; its target is the teacher's x0_hat for any final abar.

    Stable Diffusion's scheduler ends at abar_0 = 0.99915 (`set_alpha_to_one=False`): dividing z_t' by alpha_t' there
    left 0.03 eps in the target and a loss of about 0.2 at SNR 586 for a student identical to its teacher.
    """
    model = str(tmp_path / "model")
    # Stable Diffusion 1.5's schedule: scaled-linear betas, timesteps offset by one, no clipping.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
    )
    DDPMPipeline(unet=tiny_class_unet(), scheduler=scheduler).save_pretrained(model)
    config_path = os.path.join(model, "scheduler", "scheduler_config.json")
    config = json.load(open(config_path)) | {"set_alpha_to_one": set_alpha_to_one}
    json.dump(config, open(config_path, "w"))
    teacher = TinyGuide(tiny_class_unet())
    torch.nn.init.normal_(teacher.out.weight, std=0.1)  # a trained-looking guide, not the zero no-op
    teacher.save_pretrained(str(tmp_path / "guides" / "tiny" / "steps-8"))
    module = ProgressiveHalving(
        guide_root=str(tmp_path / "guides"), teacher_steps=8, diffusion_model=model, loss_weighting="eps"
    )
    assert module.final_alpha_cumprod == (1.0 if set_alpha_to_one else pytest.approx(0.99915))
    batch = digits_batch(6)
    x0, condition, _ = module.encode_batch(batch)
    last = torch.full((6,), 3)
    with torch.no_grad():
        loss = module.halving_loss(
            x0,
            condition,
            last,
            torch.full((6,), 4.0),
            torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)),
        )
        other = module.halving_loss(
            x0,
            condition,
            last - 1,
            torch.full((6,), 4.0),
            torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)),
        )
    assert float(loss) < 1e-8 < float(other)  # two teacher steps differ from one student step elsewhere


def test_one_pass_sampling_matches_cfg_noise_and_fresh_guide_gives_conditional_samples():
    unet, scheduler = tiny_class_unet().eval(), DDIMScheduler.from_config(tiny_scheduler().config)
    labels = torch.tensor([0, 1, 2])
    guided = GuideDistilledPipeline(unet, TinyGuide(unet), scheduler)
    plain = GuidedDiffusionPipeline(unet, DDIMScheduler.from_config(scheduler.config))
    one_pass = guided(
        class_labels=labels,
        num_inference_steps=4,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    conditional = plain(
        class_labels=labels,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert one_pass.shape == (3, 1, 8, 8)
    assert torch.equal(one_pass, conditional)  # a fresh guide steers nothing; same seeds give the same noise


def test_flop_counting_shows_one_pass_saving():
    unet = tiny_class_unet(widths=(16, 32)).eval()
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor(500), torch.tensor([1, 2, 3, 4])
    cfg_pipeline = GuidedDiffusionPipeline(unet, DDIMScheduler())

    def flops(fn) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    cfg = flops(lambda: cfg_pipeline.predict_output(x, t, labels, cfg_weight=4.0))
    tiny = flops(lambda: predict_guided_noise(unet, TinyGuide(unet), x, t, 4.0, labels))
    full = flops(lambda: predict_guided_noise(unet, FullGuide(unet), x, t, 4.0, labels))
    assert tiny <= 0.55 * cfg, tiny / cfg
    assert 0.55 * cfg < full < cfg, full / cfg


# -- Stable Diffusion code path on tiny random components -------------------------------------------------


def write_tiny_text_to_image_pipeline(path: str) -> None:
    """unet/ (cross-attention), vae/, text_encoder/ (CLIP), tokenizer/, scheduler/ with random weights, offline."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    ).save_pretrained(os.path.join(path, "unet"))
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(os.path.join(path, "vae"))
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
        )
    ).save_pretrained(os.path.join(path, "text_encoder"))
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = (
        {"<|startoftext|>": 0, "<|endoftext|>": 1}
        | {c: 2 + i for i, c in enumerate(letters)}
        | {c + "</w>": 28 + i for i, c in enumerate(letters)}
    )
    os.makedirs(os.path.join(path, "tokenizer"))
    with open(os.path.join(path, "tokenizer", "vocab.json"), "w") as file:
        json.dump(vocab, file)
    with open(os.path.join(path, "tokenizer", "merges.txt"), "w") as file:
        file.write("#version: 0.2\n")
    CLIPTokenizer(
        os.path.join(path, "tokenizer", "vocab.json"),
        os.path.join(path, "tokenizer", "merges.txt"),
        model_max_length=16,
    ).save_pretrained(os.path.join(path, "tokenizer"))
    DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).save_pretrained(os.path.join(path, "scheduler"))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-sd"))
    write_tiny_text_to_image_pipeline(path)
    return path


@pytest.mark.parametrize("guide_class", [TinyGuide, FullGuide])
def test_text_to_image_latent_distillation_path(text_model, guide_class):
    module = GuideDistillation(guide=guide_class, diffusion_model=text_model, vae="vae", text_encoder="text_encoder")
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a red bird", "two cats"]}
    loss = module._loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(
        not p.requires_grad
        for p in list(module.unet.parameters())
        + list(module.text_encoder.parameters())
        + list(module.vae.parameters())
    )
    images = module.sampling_pipeline()(
        prompt=["a dog"],
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (1, 3, 16, 16)


# -- every config of this job is instantiated ------------------------------------------------------------


def run_cli(args: list[str]) -> None:
    from plugguide.cli import main

    with mock.patch.object(sys, "argv", ["lightning", *args]):
        main()


def test_guide_distillation_and_halving_configs_run(digits_model, tmp_path, monkeypatch):
    """The real configs, on the tiny UNet: distill, then the three halving stages, each from the previous run's export
    as its stage file names it (`guide_root`: version_0 of the run before)."""
    import yaml

    from plugguide.models.classifier import TimmClassifier

    monkeypatch.chdir(tmp_path)
    TimmClassifier("resnet10t", num_classes=10, in_chans=1).save_pretrained("evaluator")
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "max_steps": 2,
                    "log_every_n_steps": 1,
                    "limit_val_batches": 1,
                    "check_val_every_n_epoch": 1,
                    "enable_progress_bar": False,
                    "callbacks": [
                        {"class_path": "plugguide.callbacks.ExportPretrained", "init_args": {"directory": "guides"}},
                        {
                            "class_path": "plugguide.callbacks.guide_grid.GuideSampleGrid",
                            "init_args": {
                                "guidance_scales": [3.0, 9.0],
                                "num_per_class": 1,
                                "num_inference_steps": 2,
                                "evaluator_path": "evaluator",
                            },
                        },
                    ],
                },
                "model": {"init_args": {"diffusion_model": digits_model}},
                "data": {"init_args": {"image_size": 8, "batch_size": 8}},
            }
        )
    )
    run_cli(
        [
            "fit",
            "-c",
            os.path.join(CONFIGS, "guide_distillation.yaml"),
            "-c",
            str(overrides),
            "--model.init_args.guide.init_args.hidden_dim=8",
        ]
    )
    assert os.path.isfile("runs/guide-distillation/version_0/guides/tiny/steps-32/model.safetensors")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "guide-distillation" / "version_0"))
    events.Reload()
    assert {"guide_vs_cfg/g=3", "guide_vs_cfg/g=9"} <= set(events.Tags()["images"])
    assert (
        "guide_vs_cfg/guided_accuracy_guide_g9" in events.Tags()["scalars"]
        and "train/loss" in events.Tags()["scalars"]
    )
    for stage, steps in (("32to16", 16), ("16to8", 8), ("8to4", 4)):
        run_cli(
            [
                "fit",
                "-c",
                os.path.join(CONFIGS, "halving", "base.yaml"),
                "-c",
                os.path.join(CONFIGS, "halving", f"{stage}.yaml"),
                "-c",
                str(overrides),
            ]
        )
        assert os.path.isfile(f"runs/halving/{stage}/version_0/guides/tiny/steps-{steps}/model.safetensors")


def test_finetune_config_loads_the_base_and_trains_on_thick_digits(tmp_path, monkeypatch):
    from plugguide.datamodules.transformed_digits import ThickDigitsDataModule

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    base = UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        mid_block_type="UNetMidBlock2D",
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=11,
    )
    DDPMPipeline(unet=base, scheduler=tiny_scheduler()).save_pretrained("base")
    run_cli(
        [
            "fit",
            "-c",
            os.path.join(CONFIGS, "pretrain", "ddpm_cond_finetune.yaml"),
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
            "--model.init_args.pretrained_path=base",
            "--data.init_args.batch_size=8",
            "--trainer.callbacks=plugguide.callbacks.ExportPretrained",
            f"--trainer.callbacks.directory={tmp_path / 'thick'}",
        ]
    )
    tuned = UNet2DConditionModel.from_pretrained(str(tmp_path / "thick"), subfolder="unet")
    moved = [name for name, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[name])]
    assert moved and len(moved) < len(base.state_dict()) + 1  # started from the base's weights, then trained
    from plugguide.datamodules.digits import DigitsDataModule

    thin, thick = DigitsDataModule(batch_size=16), ThickDigitsDataModule(batch_size=16)
    thin.setup(), thick.setup()
    thin_batch, thick_batch = next(iter(thin.val_dataloader())), next(iter(thick.val_dataloader()))
    assert torch.equal(thin_batch["label"], thick_batch["label"])  # same split, same order
    assert (
        bool((thick_batch["image"] >= thin_batch["image"]).all())
        and thick_batch["image"].mean() > thin_batch["image"].mean() + 0.1
    )
    with pytest.raises(ValueError, match="stroke_kernel"):
        ThickDigitsDataModule(stroke_kernel=2)


def test_sd15_config_runs_on_tiny_components(text_model, tmp_path, monkeypatch):
    import datasets
    import numpy as np
    import PIL.Image

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(6)]
    datasets.Dataset.from_dict(
        {"image": images, "text": ["a red bird", "two cats", "a dog", "blue sky", "a tree", "the sea"]}
    ).save_to_disk("captions")
    run_cli(
        [
            "fit",
            "-c",
            os.path.join(CONFIGS, "hub", "sd15_guide_distillation.yaml"),
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
            "--trainer.precision=32",
            "--trainer.accumulate_grad_batches=1",
            f"--model.init_args.diffusion_model={text_model}",
            "--model.init_args.guide.init_args.hidden_dim=8",
            "--data.init_args.source=captions",
            "--data.init_args.image_size=16",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--data.init_args.val_fraction=0.34",
            "--trainer.callbacks=plugguide.callbacks.ExportPretrained",
            "--trainer.callbacks.directory=guides",
        ]
    )
    assert os.path.isfile("runs/guides-sd15/version_0/guides/tiny/steps-32/model.safetensors")


@pytest.mark.parametrize(
    "scheduler, message",
    [
        (lambda: FlowMatchEulerDiscreteScheduler(), "FlowMatchEulerDiscreteScheduler works in flow space"),
        (lambda: EulerDiscreteScheduler(), "EulerDiscreteScheduler works in sigma space"),
        (lambda: DDPMScheduler(variance_type="learned_range"), "variance_type='learned_range'"),
        (lambda: DDPMScheduler(variance_type="fixed_large_log"), "variance_type`='fixed_large_log'"),
        (lambda: DDIMScheduler(prediction_type="v_prediction"), "prediction_type='v_prediction'"),
    ],
    ids=["flow", "sigma", "learned-range", "fixed-large-log", "v-prediction"],
)
def test_guide_distilled_pipeline_refuses_by_name_what_it_would_step_wrongly(scheduler, message):
    unet = tiny_class_unet()
    with pytest.raises(ValueError, match=message):
        GuideDistilledPipeline(unet, TinyGuide(unet), scheduler())


@pytest.mark.parametrize(
    "scheduler",
    [DDPMScheduler(variance_type="fixed_large"), DPMSolverMultistepScheduler()],
    ids=["ddpm-fixed-large", "dpm-solver"],
)
def test_guide_distilled_pipeline_steps_the_vp_samplers_it_accepts(scheduler):
    unet = tiny_class_unet()
    pipeline = GuideDistilledPipeline(unet, TinyGuide(unet), scheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        class_labels=[1, 2],
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 1, unet.config.sample_size, unet.config.sample_size) and torch.isfinite(images).all()


def test_guide_distillation_draws_g_in_guidance_range_and_targets_diffusers_cfg(digits_model):
    """`guidance_range` is in diffusers' g: the guide reads g - 1 and the target is eps(null) + g (eps(c) - eps(null))."""
    module = GuideDistillation(
        guide=lambda unet: TinyGuide(unet, hidden_dim=8), diffusion_model=digits_model, guidance_range=(3.0, 5.0)
    )
    drawn, read = [], []
    sample_guidance, residuals = module.sample_guidance, module.guide.residuals
    module.sample_guidance = lambda *args: drawn.append(sample_guidance(*args)) or drawn[-1]
    module.guide.residuals = lambda unet, sample, t, cfg_weight, *args: (
        read.append(cfg_weight) or residuals(unet, sample, t, cfg_weight, *args)
    )
    with torch.no_grad():
        module._loss(digits_batch(16), torch.Generator().manual_seed(0))
    assert 3.0 <= drawn[0].min() and drawn[0].max() <= 5.0
    torch.testing.assert_close(read[0], drawn[0] - 1)

    def loss_at(g: float) -> float:
        module.hparams.guidance_range = (g, g)
        # A fresh guide is a no-op, so the loss is |eps(c) - target|^2 = (g - 1)^2 |eps(c) - eps(null)|^2.
        with torch.no_grad():
            return module._loss(digits_batch(16), torch.Generator().manual_seed(0)).item()

    assert loss_at(1.0) < 1e-12  # g = 1: no guidance, the target is eps(c) itself
    assert loss_at(5.0) / loss_at(3.0) == pytest.approx(4.0, rel=1e-4)  # ((5 - 1) / (3 - 1))^2


def test_a_checkpoint_saved_with_the_range_in_g_minus_one_is_read_as_g(digits_model, tmp_path, caplog):
    """Checkpoints written before `guidance_range` took diffusers' g held g - 1 (no unit key): read back as g."""
    from plugguide.checkpoint_settings import check_checkpoint_settings
    from plugguide.modules.guide_distillation import GUIDANCE_RANGE_UNIT_KEY

    module = GuideDistillation(guide=lambda unet: TinyGuide(unet, hidden_dim=8), diffusion_model=digits_model)
    assert tuple(module.hparams.guidance_range) == (3.0, 10.0)
    saved = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(saved)
    assert saved[GUIDANCE_RANGE_UNIT_KEY] == "guidance_scale"
    module.on_load_checkpoint(saved)
    assert tuple(saved["hyper_parameters"]["guidance_range"]) == (3.0, 10.0)  # written in g: left as it is

    legacy = {"state_dict": module.state_dict(), "hyper_parameters": {**module.hparams, "guidance_range": (2.0, 9.0)}}
    torch.save(legacy, tmp_path / "legacy.ckpt")
    module.on_load_checkpoint(legacy)
    assert tuple(legacy["hyper_parameters"]["guidance_range"]) == (3.0, 10.0)
    with caplog.at_level("INFO"):
        check_checkpoint_settings(str(tmp_path / "legacy.ckpt"), module)
    assert "guidance_range" not in caplog.text  # the same settings: nothing to report
