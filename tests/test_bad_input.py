"""Wrong settings fail at once, in the constructor of the class that owns them, naming the setting and the value."""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
from unittest import mock

import pytest
import torch
from diffusers import DDIMScheduler

from plugguide.callbacks import GuidedSampleGrid, TargetMapGrid
from plugguide.callbacks.guide_grid import GuideSampleGrid
from plugguide.datamodules import (
    ClassLabelDataModule,
    DigitsDataModule,
    ImageDataModule,
    SynthesizedImageDataModule,
    TargetMapDataModule,
)
from plugguide.models import DenseModel, MultiExpertModel, TimmClassifier
from plugguide.models.guides import TinyGuide
from plugguide.modules import (
    ClassifierPretraining,
    DensePretraining,
    DiffusionPretraining,
    ExpertDistillation,
    GuidedSampling,
)
from plugguide.modules.guide_distillation import GuideDistillation
from plugguide.modules.progressive_halving import ProgressiveHalving
from plugguide.pipelines.guidance import CalibratedGuidance, ExpertGuidance
from plugguide.pipelines.guidance.naive_classifier import NaiveClassifierGuidance
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline
from plugguide.pipelines.tasks import DenseRegressionTask, SegmentationTask
from tests.conftest import TINY_DEIT, TINY_RESNET, TINY_SEGMENTER, tiny_conditional_unet, tiny_scheduler, tiny_unet


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
    # Damaged copies: weights cut off mid-file (a copy that ran out of space), an experts folder missing one adapter.
    for name, source, weights in (
        ("classifier-truncated", "classifier-resnet", "model.safetensors"),
        ("ddpm-truncated", "ddpm-uncond", "unet/diffusion_pytorch_model.safetensors"),
    ):
        paths[name] = str(root / name)
        shutil.copytree(tiny_assets[source], paths[name])
        os.truncate(os.path.join(paths[name], weights), os.path.getsize(os.path.join(paths[name], weights)) // 2)
    paths["experts-missing-adapter"] = str(root / "experts")
    torch.manual_seed(0)
    MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=3, lora_rank=2).save_pretrained(
        paths["experts-missing-adapter"]
    )
    shutil.rmtree(os.path.join(paths["experts-missing-adapter"], "expert_1"))
    return paths


def experts(assets, **overrides) -> ExpertDistillation:
    settings = dict(
        teacher_path=assets["classifier-resnet"],
        diffusion_model=assets["ddpm-uncond"],
        num_experts=3,
        lora_rank=4,
        evaluator_path=None,
    )
    return ExpertDistillation(**settings | overrides)


def synthesized(assets, tmp_path, **overrides) -> SynthesizedImageDataModule:
    settings = dict(
        diffusion_model=assets["ddpm-uncond"],
        num_inference_steps=2,
        num_images=8,
        shard_size=4,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
        max_saturated_fraction=None,
    )
    return SynthesizedImageDataModule(**settings | overrides)


def grid_on_experts(assets, tmp_path) -> None:
    GuidedSampleGrid(num_classes=12).setup(None, experts(assets), "fit")


def target_beyond_classes(assets, tmp_path) -> None:
    torch.manual_seed(0)
    pipeline = GuidedDiffusionPipeline(
        tiny_unet(), tiny_scheduler(), NaiveClassifierGuidance(TimmClassifier(**TINY_RESNET))
    )
    pipeline(class_labels=[3, 12], num_inference_steps=1, classifier_scale=1.0, output_type="pt")


def unreadable_cache(assets, tmp_path) -> None:
    (tmp_path / "cache").write_text("not a directory")
    synthesized(assets, tmp_path)


def read_only_parent_of_cache(assets, tmp_path) -> None:
    """A new cache_dir under a read-only file system (simulated: the tests may run as root, whom permissions do not stop)."""
    parent = str(tmp_path / "read-only")
    os.makedirs(parent)
    real_access = os.access
    with mock.patch(
        "os.access", lambda path, mode: False if os.path.abspath(path) == parent else real_access(path, mode)
    ):
        synthesized(assets, tmp_path, cache_dir=os.path.join(parent, "cache"))


def full_disk(assets, tmp_path) -> None:
    import datasets

    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch.object(datasets.Dataset, "save_to_disk", full):
        synthesized(assets, tmp_path).generate()


def sample(assets, **overrides) -> GuidedSampling:
    return GuidedSampling(
        **dict(diffusion_model=assets["ddpm-uncond"], num_inference_steps=1, evaluator_path=None) | overrides
    )


def sampling_classes_beyond_the_unet(assets, tmp_path) -> None:
    """`--data.num_classes 11` with a 10-class conditional UNet: class 10 is its null class, not a class."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.predict(
        sample(assets, diffusion_model=assets["ddpm-cond"], guidance_scale=4.0),
        ClassLabelDataModule(num_per_class=1, num_classes=11, batch_size=11),
    )


def conditional_pipeline_call(labels, **scales) -> None:
    GuidedDiffusionPipeline(tiny_conditional_unet(), tiny_scheduler())(
        class_labels=labels, num_inference_steps=1, output_type="pt", **scales
    )


def unguided_pipeline_call(**settings) -> None:
    GuidedDiffusionPipeline(tiny_unet(), tiny_scheduler())(
        batch_size=1, num_inference_steps=1, output_type="pt", **settings
    )


def clipped_guidance_call(num_inference_steps: int = 1, **scales) -> None:
    torch.manual_seed(0)
    pipeline = GuidedDiffusionPipeline(
        tiny_unet(), tiny_scheduler(), NaiveClassifierGuidance(TimmClassifier(**TINY_RESNET), clip_gradient=1.0)
    )
    pipeline(class_labels=[3, 4], num_inference_steps=num_inference_steps, output_type="pt", **scales)


def damaged_cache(assets, tmp_path) -> None:
    module = synthesized(assets, tmp_path)
    os.makedirs(module.cache_path)
    module.load()  # nothing generated: every shard is missing


def hub_id_offline(assets, tmp_path) -> None:
    experts(assets, diffusion_model="google/ddpm-cifar10-32")


def halving(assets, tmp_path, teacher_steps: int = 4, guide_unet=None) -> None:
    """A halving stage whose teacher guide (saved for `guide_unet`, default the stage's own UNet) sits in `guide_root`."""
    from plugguide.models.diffusion_model import load_unet

    TinyGuide(guide_unet or load_unet(assets["ddpm-cond"]), hidden_dim=8).save_pretrained(
        str(tmp_path / "guides" / "tiny" / "steps-4")
    )
    ProgressiveHalving(
        guide_root=str(tmp_path / "guides"),
        guide_name="tiny",
        teacher_steps=teacher_steps,
        diffusion_model=assets["ddpm-cond"],
    )


def guide_for_another_unet(assets, tmp_path) -> None:
    other = tiny_conditional_unet(block_out_channels=(8, 8))
    halving(assets, tmp_path, guide_unet=other)


def guide_on_unconditional_unet(assets, tmp_path) -> None:
    GuideDistillation(guide=lambda unet: TinyGuide(unet, hidden_dim=8), diffusion_model=assets["ddpm-uncond"])


def dense_guided_call(guide: str, assets, **targets) -> None:
    """One guided step of the tiny UNet with an off-the-shelf `guide` of the tiny assets, toward `targets`."""
    pipeline = GuidedDiffusionPipeline(tiny_unet(), tiny_scheduler(), NaiveClassifierGuidance(assets[guide]))
    pipeline(num_inference_steps=1, classifier_scale=1.0, output_type="pt", **targets)


def target_maps_with_a_distilled_guide(assets, tmp_path) -> None:
    """The sampling job with target maps and a distilled CFG guide, which takes classes."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    TinyGuide(tiny_conditional_unet(), hidden_dim=8).save_pretrained(str(tmp_path / "guide"))
    module = sample(
        assets, diffusion_model=assets["ddpm-cond"], guide_path=str(tmp_path / "guide"), guidance_scale=3.0
    )
    trainer.predict(module, TargetMapDataModule(model_path=assets["segmenter"], num_samples=2, batch_size=2))


# A tiny smp DeepLabV3+ (its ASPP convs are dilated).
TINY_DEEPLABV3PLUS = TINY_SEGMENTER | dict(
    architecture="DeepLabV3Plus",
    model_kwargs=dict(
        encoder_name="tu-resnet18", encoder_depth=3, layers=[1, 1, 1, 1], channels=[8, 8, 16, 16], decoder_channels=16
    ),
)

# (id, build, exception type, setting named in the message, value named in the message)
BAD_SETTINGS = [
    (
        "missing-teacher-path",
        lambda a, t: experts(a, teacher_path=str(t / "no-such-classifier")),
        FileNotFoundError,
        "model.teacher_path",
        "no-such-classifier",
    ),
    (
        "missing-diffusion-model",
        lambda a, t: experts(a, diffusion_model="./no/such/model"),
        FileNotFoundError,
        "model.diffusion_model",
        "./no/such/model",
    ),
    ("hub-id-without-network", hub_id_offline, OSError, "model.diffusion_model", "google/ddpm-cifar10-32"),
    (
        "missing-evaluator",
        lambda a, t: experts(a, evaluator_path=str(t / "gone")),
        FileNotFoundError,
        "evaluator_path",
        "gone",
    ),
    ("num-experts-below-1", lambda a, t: experts(a, num_experts=0), ValueError, "num_experts", "0"),
    ("num-experts-above-T", lambda a, t: experts(a, num_experts=1001), ValueError, "num_experts", "1001"),
    (
        "expert-ranges-leave-a-gap",
        lambda a, t: MultiExpertModel(TimmClassifier(**TINY_RESNET), timestep_boundaries=[0, 400, 900]),
        ValueError,
        "timestep_boundaries",
        "[0, 400, 900]",
    ),
    (
        "expert-ranges-overlap",
        lambda a, t: MultiExpertModel(TimmClassifier(**TINY_RESNET), timestep_boundaries=[0, 600, 400, 1000]),
        ValueError,
        "timestep_boundaries",
        "[0, 600, 400, 1000]",
    ),
    ("grid-rows-beyond-classifier-classes", grid_on_experts, ValueError, "num_classes", "12"),
    ("target-label-beyond-classifier-classes", target_beyond_classes, ValueError, "class_labels", "12"),
    (
        "teacher-channels-differ-from-unet",
        lambda a, t: experts(a, teacher_path=a["classifier-rgb"]),
        ValueError,
        "teacher_path",
        "3 channels",
    ),
    (
        "teacher-image-size-differs-from-unet",
        lambda a, t: experts(a, teacher_path=a["classifier-deit-8px"]),
        ValueError,
        "teacher_path",
        "16x16",
    ),
    (
        "evaluator-classes-differ-from-teacher",
        lambda a, t: experts(a, evaluator_path=a["evaluator-5-classes"]),
        ValueError,
        "evaluator_path",
        "5 classes",
    ),
    (
        "negative-guidance-scale-experts",
        lambda a, t: experts(a, classifier_scale=-1.0),
        ValueError,
        "classifier_scale",
        "-1.0",
    ),
    (
        "negative-guidance-scale-sampling",
        lambda a, t: GuidedSampling(diffusion_model=a["ddpm-uncond"], classifier_scale=-0.5, evaluator_path=None),
        ValueError,
        "classifier_scale",
        "-0.5",
    ),
    (
        "negative-guidance-scale-grid",
        lambda a, t: GuidedSampleGrid(classifier_scale=-2.0),
        ValueError,
        "classifier_scale",
        "-2.0",
    ),
    (
        "unknown-sampler",
        lambda a, t: experts(a, scheduler="LMSDiscreteScheduler"),
        ValueError,
        "model.scheduler",
        "LMSDiscreteScheduler",
    ),
    (
        "noise-schedule-not-a-forward-process",
        lambda a, t: DiffusionPretraining(tiny_unet(), DDIMScheduler()),
        ValueError,
        "noise_scheduler",
        "DDIMScheduler",
    ),
    (
        "prompt-for-a-model-without-text",
        lambda a, t: GuidedSampling(diffusion_model=a["ddpm-uncond"], prompt="a seven", evaluator_path=None),
        ValueError,
        "prompt",
        "a seven",
    ),
    (
        "sampler-of-another-model-family",
        lambda a, t: synthesized(a, t, scheduler="FlowMatchEulerDiscreteScheduler"),
        ValueError,
        "data.scheduler",
        "FlowMatchEulerDiscreteScheduler",
    ),
    (
        "unknown-synthesis-scheduler",
        lambda a, t: synthesized(a, t, scheduler="NoSuchScheduler"),
        ValueError,
        "data.scheduler",
        "NoSuchScheduler",
    ),
    (
        "lora-targets-absent",
        lambda a, t: experts(a, target_modules=["no_such_layer"]),
        ValueError,
        "target_modules",
        "no_such_layer",
    ),
    ("bad-temperature", lambda a, t: experts(a, temperature=0.0), ValueError, "temperature", "0.0"),
    ("bad-supervision", lambda a, t: experts(a, supervision="soft"), ValueError, "supervision", "soft"),
    ("bad-finetune", lambda a, t: experts(a, finetune="half"), ValueError, "finetune", "half"),
    ("negative-seed", lambda a, t: experts(a, seed=-1), ValueError, "seed", "-1"),
    ("unreadable-cache-dir", unreadable_cache, ValueError, "cache_dir", "cache"),
    ("damaged-cache", damaged_cache, RuntimeError, "data.cache_dir", "[0, 1]"),
    ("empty-synthesized-set", lambda a, t: synthesized(a, t, num_images=0), ValueError, "num_images", "0"),
    (
        "batch-larger-than-synthesized-set",
        lambda a, t: synthesized(a, t, batch_size=16),
        ValueError,
        "batch_size",
        "16",
    ),
    (
        "labelled-data-size-differs-from-unet",
        lambda a, t: synthesized(a, t, labelled_data=DigitsDataModule(image_size=32)),
        ValueError,
        "labelled_data.image_size",
        "32",
    ),
    (
        "unknown-synthesis-autocast-dtype",
        lambda a, t: synthesized(a, t, autocast_dtype="float64"),
        ValueError,
        "autocast_dtype",
        "float64",
    ),
    (
        "unknown-sampling-autocast-dtype",
        lambda a, t: GuidedSampling(diffusion_model=a["ddpm-uncond"], autocast_dtype="int8", evaluator_path=None),
        ValueError,
        "autocast_dtype",
        "int8",
    ),
    (
        "unknown-image-storage-dtype",
        lambda a, t: synthesized(a, t, image_dtype="float16"),
        ValueError,
        "image_dtype",
        "float16",
    ),
    (
        "synthesis-teacher-channels-differ",
        lambda a, t: synthesized(a, t, teacher_path=a["classifier-rgb"]),
        ValueError,
        "data.teacher_path",
        "3 channels",
    ),
    (
        "label-dropout-out-of-range",
        lambda a, t: DiffusionPretraining(tiny_unet(), tiny_scheduler(), label_dropout=1.5),
        ValueError,
        "label_dropout",
        "1.5",
    ),
    (
        "null-class-missing",
        lambda a, t: DiffusionPretraining(tiny_conditional_unet(), tiny_scheduler(), num_classes=11),
        ValueError,
        "num_classes",
        "11",
    ),
    (
        "missing-pretrained-path",
        lambda a, t: DiffusionPretraining(tiny_unet(), tiny_scheduler(), pretrained_path="./no/such/pipeline"),
        FileNotFoundError,
        "pretrained_path",
        "./no/such/pipeline",
    ),
    (
        "negative-max-shift",
        lambda a, t: ClassifierPretraining(TimmClassifier(**TINY_RESNET), max_shift=-1),
        ValueError,
        "max_shift",
        "-1",
    ),
    (
        "label-smoothing-out-of-range",
        lambda a, t: ClassifierPretraining(TimmClassifier(**TINY_RESNET), label_smoothing=1.0),
        ValueError,
        "label_smoothing",
        "1.0",
    ),
    (
        "unknown-timm-model",
        lambda a, t: TimmClassifier(model_name="resnet9000"),
        ValueError,
        "model_name",
        "resnet9000",
    ),
    ("image-channels-not-1-or-3", lambda a, t: ImageDataModule(source="x", channels=2), ValueError, "channels", "2"),
    (
        "missing-image-source",
        lambda a, t: ImageDataModule(source="./no/such/images").setup("fit"),
        ValueError,
        "source",
        "./no/such/images",
    ),
    (
        "halving-stage-with-odd-step-count",
        lambda a, t: halving(a, t, teacher_steps=5),
        ValueError,
        "teacher_steps",
        "5",
    ),
    ("guide-built-for-another-unet", guide_for_another_unet, ValueError, "guide_root/guide_name", "steps-4"),
    ("guide-for-an-unconditional-unet", guide_on_unconditional_unet, ValueError, "diffusion_model", "ddpm-uncond"),
    (
        "non-positive-gradient-clip",
        lambda a, t: NaiveClassifierGuidance(TimmClassifier(**TINY_RESNET), clip_gradient=0.0),
        ValueError,
        "clip_gradient",
        "0.0",
    ),
    # Not a number, or not finite: NaN passed every `< 0` check and switched guidance off; inf made every sample NaN.
    (
        "nan-guidance-scale-experts",
        lambda a, t: experts(a, classifier_scale=math.nan),
        ValueError,
        "classifier_scale",
        "nan",
    ),
    (
        "nan-guidance-scale-sampling",
        lambda a, t: sample(a, classifier_scale=math.nan),
        ValueError,
        "classifier_scale",
        "nan",
    ),
    (
        "infinite-cfg-scale-sampling",
        lambda a, t: sample(a, guidance_scale=math.inf),
        ValueError,
        "guidance_scale",
        "inf",
    ),
    (
        "nan-guidance-scale-grid",
        lambda a, t: GuidedSampleGrid(classifier_scale=math.nan),
        ValueError,
        "classifier_scale",
        "nan",
    ),
    (
        "nan-cfg-scale-grid",
        lambda a, t: GuidedSampleGrid(guidance_scale=math.nan),
        ValueError,
        "guidance_scale",
        "nan",
    ),
    (
        "classifier-scale-without-guidance-sampling",
        lambda a, t: sample(a, classifier_scale=7.5),
        ValueError,
        "model.classifier_scale",
        "7.5",
    ),
    (
        "classifier-scale-without-guidance-pipeline-call",
        lambda a, t: unguided_pipeline_call(classifier_scale=7.5),
        ValueError,
        "classifier_scale",
        "7.5",
    ),
    (
        "cfg-on-an-unconditional-model-sampling",
        lambda a, t: sample(a, guidance_scale=7.5),
        ValueError,
        "model.guidance_scale",
        "7.5",
    ),
    (
        "cfg-on-an-unconditional-model-pipeline-call",
        lambda a, t: unguided_pipeline_call(guidance_scale=7.5),
        ValueError,
        "guidance_scale",
        "7.5",
    ),
    ("cfg-weight-below-one-sampling", lambda a, t: sample(a, guidance_scale=0.5), ValueError, "guidance_scale", "0.5"),
    (
        "prompt-for-an-unconditional-model-pipeline-call",
        lambda a, t: unguided_pipeline_call(prompt="a three"),
        ValueError,
        "prompt",
        "a three",
    ),
    (
        "nan-guide-grid-scale",
        lambda a, t: GuideSampleGrid(guidance_scales=[2.0, math.nan]),
        ValueError,
        "guidance_scales",
        "nan",
    ),
    (
        "infinite-guidance-range",
        lambda a, t: GuideDistillation(
            guide=lambda unet: TinyGuide(unet, hidden_dim=8),
            diffusion_model=a["ddpm-cond"],
            guidance_range=(2.0, math.inf),
        ),
        ValueError,
        "model.guidance_range",
        "inf",
    ),
    (
        "guidance-range-below-one",
        lambda a, t: GuideDistillation(
            guide=lambda unet: TinyGuide(unet, hidden_dim=8),
            diffusion_model=a["ddpm-cond"],
            guidance_range=(0.5, 9.0),
        ),
        ValueError,
        "model.guidance_range",
        "0.5",
    ),
    (
        "nan-gradient-clip",
        lambda a, t: NaiveClassifierGuidance(TimmClassifier(**TINY_RESNET), clip_gradient=math.nan),
        ValueError,
        "clip_gradient",
        "nan",
    ),
    (
        "nan-guidance-scale-pipeline-call",
        lambda a, t: clipped_guidance_call(classifier_scale=math.nan),
        ValueError,
        "classifier_scale",
        "nan",
    ),
    (
        "infinite-guidance-scale-with-clipping",
        lambda a, t: clipped_guidance_call(classifier_scale=math.inf),
        ValueError,
        "classifier_scale",
        "inf",
    ),
    (
        "nan-cfg-scale-pipeline-call",
        lambda a, t: conditional_pipeline_call([1, 2], guidance_scale=math.nan),
        ValueError,
        "guidance_scale",
        "nan",
    ),
    # The null class of a class-conditional UNet taken as a target: unconditional samples scored as "class 10", or an IndexError.
    (
        "cfg-target-is-the-null-class",
        lambda a, t: conditional_pipeline_call([3, 10], guidance_scale=4.0),
        ValueError,
        "class_labels",
        "10",
    ),
    (
        "cfg-target-beyond-the-null-class",
        lambda a, t: conditional_pipeline_call([11], guidance_scale=4.0),
        ValueError,
        "class_labels",
        "11",
    ),
    ("sampling-classes-beyond-the-unet", sampling_classes_beyond_the_unet, ValueError, "data.num_classes", "11"),
    # Files and folders that name nothing when they fail.
    ("read-only-parent-of-new-cache-dir", read_only_parent_of_cache, ValueError, "cache_dir", "read-only"),
    ("full-disk-while-synthesizing", full_disk, OSError, "data.cache_dir", "No space left on device"),
    (
        "truncated-classifier-weights",
        lambda a, t: experts(a, teacher_path=a["classifier-truncated"]),
        OSError,
        "model.teacher_path",
        "classifier-truncated",
    ),
    (
        "truncated-unet-weights",
        lambda a, t: experts(a, diffusion_model=a["ddpm-truncated"]),
        OSError,
        "model.diffusion_model",
        "damaged",
    ),
    (
        "experts-folder-missing-an-adapter",
        lambda a, t: ExpertGuidance(a["experts-missing-adapter"]),
        FileNotFoundError,
        "experts",
        "expert_1/",
    ),
    (
        "rgb-classifier-guiding-the-sampling-job",
        lambda a, t: sample(a, guidance=NaiveClassifierGuidance(a["classifier-rgb"]), classifier_scale=1.0),
        ValueError,
        "guidance",
        "3 channels",
    ),
    (
        "rgb-evaluator-of-the-sampling-job",
        lambda a, t: sample(a, evaluator_path=a["classifier-rgb"]),
        ValueError,
        "evaluator_path",
        "3 channels",
    ),
    ("zero-sampling-batch-size", lambda a, t: ClassLabelDataModule(batch_size=0), ValueError, "batch_size", "0"),
    # Dense guides: a target of another kind, a map naming a class the segmenter lacks, settings of no meaning.
    (
        "segmenter-guided-toward-class-labels",
        lambda a, t: dense_guided_call("segmenter", a, class_labels=[1, 2]),
        ValueError,
        "targets",
        "label map",
    ),
    (
        "target-map-class-beyond-the-segmenter",
        lambda a, t: dense_guided_call("segmenter", a, targets=torch.full((2, 16, 16), 11)),
        ValueError,
        "targets",
        "0..10",
    ),
    (
        "depth-guided-toward-label-maps",
        lambda a, t: dense_guided_call("depth", a, targets=torch.zeros(2, 16, 16, dtype=torch.long)),
        ValueError,
        "targets",
        "real-valued",
    ),
    (
        "classifier-guided-toward-maps",
        lambda a, t: dense_guided_call("classifier-resnet", a, targets=torch.zeros(2, 16, 16, dtype=torch.long)),
        ValueError,
        "targets",
        "(2, 16, 16)",
    ),
    (
        "one-target-map-for-two-samples",
        lambda a, t: dense_guided_call(
            "segmenter", a, class_labels=[-1, -1], targets=torch.zeros(1, 16, 16, dtype=torch.long)
        ),
        ValueError,
        "targets",
        "1 `targets` for 2",
    ),
    (
        "temperatures-on-a-depth-regressor",
        lambda a, t: CalibratedGuidance(a["depth"]),
        ValueError,
        "marginal_discount",
        "0.5",
    ),
    ("unknown-regression-loss", lambda a, t: DenseRegressionTask(loss="l1"), ValueError, "loss", "l1"),
    (
        "bad-segmentation-temperature",
        lambda a, t: SegmentationTask(temperature=-1.0),
        ValueError,
        "temperature",
        "-1.0",
    ),
    ("unknown-dense-model-library", lambda a, t: DenseModel(library="keras"), ValueError, "library", "keras"),
    ("dense-model-of-one-class", lambda a, t: DenseModel(num_classes=1), ValueError, "num_classes", "1"),
    (
        "missing-target-map-model",
        lambda a, t: TargetMapDataModule(model_path=str(t / "gone")),
        FileNotFoundError,
        "model_path",
        "gone",
    ),
    (
        "target-maps-from-an-unknown-split",
        lambda a, t: TargetMapDataModule(model_path=a["segmenter"], splits=["holdout"]),
        ValueError,
        "splits",
        "holdout",
    ),
    ("target-maps-with-a-distilled-guide", target_maps_with_a_distilled_guide, ValueError, "guide_path", "guide"),
    (
        "unknown-dense-export-dtype",
        lambda a, t: DensePretraining(DenseModel(**TINY_SEGMENTER), export_dtype="bfloat16"),
        ValueError,
        "export_dtype",
        "bfloat16",
    ),
    (
        "nan-naive-target-map-grid-scale",
        lambda a, t: TargetMapGrid(naive_classifier_scale=math.nan),
        ValueError,
        "naive_classifier_scale",
        "nan",
    ),
    # peft builds a conv's LoRA branch without the conv's dilation (huggingface/peft#3697): a shape error at the first step.
    (
        "lora-on-dilated-convolutions",
        lambda a, t: MultiExpertModel(DenseModel(**TINY_DEEPLABV3PLUS), target_modules=r"model\.decoder\.aspp\..*"),
        ValueError,
        "target_modules",
        "dilated",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "setting", "value"), [row[1:] for row in BAD_SETTINGS], ids=[row[0] for row in BAD_SETTINGS]
)
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


def overflowing_guided_samples() -> None:
    """A finite scale can still overflow float32: samples turn inf/NaN at the first guided step."""
    clipped_guidance_call(classifier_scale=1e300, num_inference_steps=2)


def samples_of_a_nan_unet() -> None:
    unet = tiny_unet()
    unet.conv_out.bias.data[0] = math.nan  # a damaged checkpoint
    GuidedDiffusionPipeline(unet, tiny_scheduler())(batch_size=2, num_inference_steps=2, output_type="pt")


def guide_distilled_samples_of_a_nan_unet() -> None:
    from plugguide.pipelines import GuideDistilledPipeline

    unet = tiny_conditional_unet()
    unet.conv_out.bias.data[0] = math.nan
    GuideDistilledPipeline(unet, TinyGuide(unet, hidden_dim=8), tiny_scheduler())(
        class_labels=[1, 2], num_inference_steps=2, output_type="pt"
    )


@pytest.mark.parametrize(
    "sample",
    [overflowing_guided_samples, samples_of_a_nan_unet, guide_distilled_samples_of_a_nan_unet],
    ids=lambda f: f.__name__,
)
def test_non_finite_samples_stop_sampling_naming_the_step(sample):
    """Never scored: a NaN image would count as some class for the evaluator (the issue's "guided_accuracy=0.1000")."""
    with pytest.raises(FloatingPointError, match=r"non-finite values at step 1 of 2 \(timestep \d+\)"):
        sample()
