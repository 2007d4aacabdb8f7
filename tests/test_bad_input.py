"""Wrong settings fail at once, in the constructor of the class that owns them, naming the setting and the value."""

from __future__ import annotations

import os
import time

import pytest
import torch
from diffusers import DDIMScheduler

from plugguide.callbacks import GuidedSampleGrid
from plugguide.datamodules import DigitsDataModule, ImageDataModule, SynthesizedImageDataModule
from plugguide.models import MultiExpertClassifier, TimmClassifier
from plugguide.modules import ClassifierPretraining, DiffusionPretraining, ExpertDistillation, GuidedSampling
from plugguide.modules.guide_distillation import GuideDistillation
from plugguide.models.guides import TinyGuide
from plugguide.modules.progressive_halving import ProgressiveHalving
from plugguide.pipelines.guidance.naive_classifier import NaiveClassifierGuidance
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline
from tests.conftest import TINY_DEIT, TINY_RESNET, tiny_conditional_unet, tiny_scheduler, tiny_unet


@pytest.fixture(scope="module")
def assets(tiny_assets, tmp_path_factory) -> dict[str, str]:
    """The tiny assets plus classifiers that do not fit the tiny UNet (16x16, 1 channel, 10 classes)."""
    root = tmp_path_factory.mktemp("misfits")
    misfits = {
        "classifier-rgb": TINY_RESNET | dict(in_chans=3),
        "classifier-deit-8px": TINY_DEIT | dict(model_kwargs=TINY_DEIT["model_kwargs"] | dict(img_size=8)),
        "evaluator-5-classes": TINY_RESNET | dict(num_classes=5),
    }
    paths = dict(tiny_assets)
    for name, spec in misfits.items():
        torch.manual_seed(0)
        paths[name] = str(root / name)
        TimmClassifier(**spec).save_pretrained(paths[name])
    return paths


def experts(assets, **overrides) -> ExpertDistillation:
    settings = dict(teacher_path=assets["classifier-resnet"], diffusion_model=assets["ddpm-uncond"], num_experts=3, lora_rank=4, evaluator_path=None)
    return ExpertDistillation(**settings | overrides)


def synthesized(assets, tmp_path, **overrides) -> SynthesizedImageDataModule:
    settings = dict(diffusion_model=assets["ddpm-uncond"], num_inference_steps=2, num_images=8, shard_size=4, batch_size=4, cache_dir=str(tmp_path / "cache"))
    return SynthesizedImageDataModule(**settings | overrides)


def grid_on_experts(assets, tmp_path) -> None:
    GuidedSampleGrid(num_classes=12).setup(None, experts(assets), "fit")


def target_beyond_classes(assets, tmp_path) -> None:
    torch.manual_seed(0)
    pipeline = GuidedDiffusionPipeline(tiny_unet(), tiny_scheduler(), NaiveClassifierGuidance(TimmClassifier(**TINY_RESNET)))
    pipeline(class_labels=[3, 12], num_inference_steps=1, guidance_scale=1.0, output_type="pt")


def unreadable_cache(assets, tmp_path) -> None:
    (tmp_path / "cache").write_text("not a directory")
    synthesized(assets, tmp_path)


def damaged_cache(assets, tmp_path) -> None:
    module = synthesized(assets, tmp_path)
    os.makedirs(module.cache_path)
    module.load()  # nothing generated: every shard is missing


def hub_id_offline(assets, tmp_path) -> None:
    experts(assets, diffusion_model="google/ddpm-cifar10-32")


def halving(assets, tmp_path, teacher_steps: int = 4, guide_unet=None) -> None:
    """A halving stage whose teacher guide (saved for `guide_unet`, default the stage's own UNet) sits in `guide_root`."""
    from plugguide.models.diffusion_model import load_unet

    TinyGuide(guide_unet or load_unet(assets["ddpm-cond"]), hidden_dim=8).save_pretrained(str(tmp_path / "guides" / "tiny" / "steps-4"))
    ProgressiveHalving(guide_root=str(tmp_path / "guides"), guide_name="tiny", teacher_steps=teacher_steps, diffusion_model=assets["ddpm-cond"])


def guide_for_another_unet(assets, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D", layers_per_block=1, norm_num_groups=4, num_class_embeds=11,
    )
    halving(assets, tmp_path, guide_unet=other)


def guide_on_unconditional_unet(assets, tmp_path) -> None:
    GuideDistillation(guide=lambda unet: TinyGuide(unet, hidden_dim=8), diffusion_model=assets["ddpm-uncond"])


# (id, build, exception type, setting named in the message, value named in the message)
BAD_SETTINGS = [
    ("missing-teacher-path", lambda a, t: experts(a, teacher_path=str(t / "no-such-classifier")), FileNotFoundError, "teacher_path", "no-such-classifier"),
    ("missing-diffusion-model", lambda a, t: experts(a, diffusion_model="./no/such/model"), FileNotFoundError, "diffusion_model", "./no/such/model"),
    ("hub-id-without-network", hub_id_offline, OSError, "diffusion_model", "google/ddpm-cifar10-32"),
    ("missing-evaluator", lambda a, t: experts(a, evaluator_path=str(t / "gone")), FileNotFoundError, "evaluator_path", "gone"),
    ("num-experts-below-1", lambda a, t: experts(a, num_experts=0), ValueError, "num_experts", "0"),
    ("num-experts-above-T", lambda a, t: experts(a, num_experts=1001), ValueError, "num_experts", "1001"),
    ("expert-ranges-leave-a-gap", lambda a, t: MultiExpertClassifier(TimmClassifier(**TINY_RESNET), timestep_boundaries=[0, 400, 900]), ValueError, "timestep_boundaries", "[0, 400, 900]"),
    ("expert-ranges-overlap", lambda a, t: MultiExpertClassifier(TimmClassifier(**TINY_RESNET), timestep_boundaries=[0, 600, 400, 1000]), ValueError, "timestep_boundaries", "[0, 600, 400, 1000]"),
    ("grid-rows-beyond-classifier-classes", grid_on_experts, ValueError, "num_classes", "12"),
    ("target-label-beyond-classifier-classes", target_beyond_classes, ValueError, "class_labels", "12"),
    ("teacher-channels-differ-from-unet", lambda a, t: experts(a, teacher_path=a["classifier-rgb"]), ValueError, "teacher_path", "3 channels"),
    ("teacher-image-size-differs-from-unet", lambda a, t: experts(a, teacher_path=a["classifier-deit-8px"]), ValueError, "teacher_path", "16x16"),
    ("evaluator-classes-differ-from-teacher", lambda a, t: experts(a, evaluator_path=a["evaluator-5-classes"]), ValueError, "evaluator_path", "5 classes"),
    ("negative-guidance-scale-experts", lambda a, t: experts(a, guidance_scale=-1.0), ValueError, "guidance_scale", "-1.0"),
    ("negative-guidance-scale-sampling", lambda a, t: GuidedSampling(diffusion_model=a["ddpm-uncond"], guidance_scale=-0.5, evaluator_path=None), ValueError, "guidance_scale", "-0.5"),
    ("negative-guidance-scale-grid", lambda a, t: GuidedSampleGrid(guidance_scale=-2.0), ValueError, "guidance_scale", "-2.0"),
    ("unknown-sampler", lambda a, t: experts(a, sampler="LMSDiscreteScheduler"), ValueError, "sampler", "LMSDiscreteScheduler"),
    ("noise-schedule-not-a-forward-process", lambda a, t: DiffusionPretraining(tiny_unet(), DDIMScheduler()), ValueError, "noise_scheduler", "DDIMScheduler"),
    ("prompt-for-a-model-without-text", lambda a, t: GuidedSampling(diffusion_model=a["ddpm-uncond"], prompt="a seven", evaluator_path=None), ValueError, "prompt", "a seven"),
    ("sampler-of-another-model-family", lambda a, t: synthesized(a, t, scheduler="FlowMatchEulerDiscreteScheduler"), ValueError, "scheduler", "FlowMatchEulerDiscreteScheduler"),
    ("unknown-synthesis-scheduler", lambda a, t: synthesized(a, t, scheduler="NoSuchScheduler"), ValueError, "scheduler", "NoSuchScheduler"),
    ("lora-targets-absent", lambda a, t: experts(a, target_modules=["no_such_layer"]), ValueError, "target_modules", "no_such_layer"),
    ("bad-temperature", lambda a, t: experts(a, temperature=0.0), ValueError, "temperature", "0.0"),
    ("bad-supervision", lambda a, t: experts(a, supervision="soft"), ValueError, "supervision", "soft"),
    ("bad-finetune", lambda a, t: experts(a, finetune="half"), ValueError, "finetune", "half"),
    ("negative-seed", lambda a, t: experts(a, seed=-1), ValueError, "seed", "-1"),
    ("unreadable-cache-dir", unreadable_cache, ValueError, "cache_dir", "cache"),
    ("damaged-cache", damaged_cache, RuntimeError, "cache_dir", "[0, 1]"),
    ("empty-synthesized-set", lambda a, t: synthesized(a, t, num_images=0), ValueError, "num_images", "0"),
    ("batch-larger-than-synthesized-set", lambda a, t: synthesized(a, t, batch_size=16), ValueError, "batch_size", "16"),
    ("labelled-data-size-differs-from-unet", lambda a, t: synthesized(a, t, labelled_data=DigitsDataModule(image_size=32)), ValueError, "labelled_data.image_size", "32"),
    ("unknown-image-storage-dtype", lambda a, t: synthesized(a, t, image_dtype="float16"), ValueError, "image_dtype", "float16"),
    ("synthesis-teacher-channels-differ", lambda a, t: synthesized(a, t, teacher_path=a["classifier-rgb"]), ValueError, "teacher_path", "3 channels"),
    ("label-dropout-out-of-range", lambda a, t: DiffusionPretraining(tiny_unet(), tiny_scheduler(), label_dropout=1.5), ValueError, "label_dropout", "1.5"),
    ("null-class-missing", lambda a, t: DiffusionPretraining(tiny_conditional_unet(), tiny_scheduler(), num_classes=11), ValueError, "num_classes", "11"),
    ("missing-pretrained-path", lambda a, t: DiffusionPretraining(tiny_unet(), tiny_scheduler(), pretrained_path="./no/such/pipeline"), FileNotFoundError, "pretrained_path", "./no/such/pipeline"),
    ("negative-max-shift", lambda a, t: ClassifierPretraining(TimmClassifier(**TINY_RESNET), max_shift=-1), ValueError, "max_shift", "-1"),
    ("label-smoothing-out-of-range", lambda a, t: ClassifierPretraining(TimmClassifier(**TINY_RESNET), label_smoothing=1.0), ValueError, "label_smoothing", "1.0"),
    ("unknown-timm-model", lambda a, t: TimmClassifier(model_name="resnet9000"), ValueError, "model_name", "resnet9000"),
    ("image-channels-not-1-or-3", lambda a, t: ImageDataModule(source="x", channels=2), ValueError, "channels", "2"),
    ("missing-image-source", lambda a, t: ImageDataModule(source="./no/such/images").setup("fit"), ValueError, "source", "./no/such/images"),
    ("halving-stage-with-odd-step-count", lambda a, t: halving(a, t, teacher_steps=5), ValueError, "teacher_steps", "5"),
    ("guide-built-for-another-unet", guide_for_another_unet, ValueError, "guide_root/guide_name", "steps-4"),
    ("guide-for-an-unconditional-unet", guide_on_unconditional_unet, ValueError, "diffusion_model", "ddpm-uncond"),
    ("non-positive-gradient-clip", lambda a, t: NaiveClassifierGuidance(TimmClassifier(**TINY_RESNET), clip_gradient=0.0), ValueError, "clip_gradient", "0.0"),
]


@pytest.mark.parametrize(("build", "error", "setting", "value"), [row[1:] for row in BAD_SETTINGS], ids=[row[0] for row in BAD_SETTINGS])
def test_bad_setting_fails_early_and_names_it(assets, tmp_path, monkeypatch, build, error, setting, value):
    import diffusers.utils.constants
    import huggingface_hub.constants

    # No network here, and none needed to know that: offline mode fails at once instead of timing out.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(diffusers.utils.constants, "HF_HUB_OFFLINE", True, raising=False)
    started = time.perf_counter()
    with pytest.raises(error) as info:
        build(assets, tmp_path)
    message = str(info.value)
    assert f"`{setting}`" in message, message
    assert value in message, message
    assert time.perf_counter() - started < 10, "the check came after long work"


def test_the_table_is_large_enough():
    assert len(BAD_SETTINGS) >= 20 and len({row[0] for row in BAD_SETTINGS}) == len(BAD_SETTINGS)
