"""Speed settings: training jobs under `precision="bf16-mixed"`, pipelines and synthesis under an autocast dtype, a compiled UNet."""

from __future__ import annotations

import math

import lightning as L
import torch

from plugguide.datamodules import DigitsDataModule, SynthesizedImageDataModule
from plugguide.models import TimmClassifier
from plugguide.modules import DiffusionPretraining, ExpertDistillation, GuidedSampling
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import NaiveClassifierGuidance
from tests.conftest import TINY_RESNET, tiny_scheduler, tiny_unet


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_bf16(
    module: L.LightningModule, data: L.LightningDataModule, tmp_path, network: torch.nn.Module
) -> RecordLosses:
    """Three bf16-mixed steps; asserts finite losses and that `network`'s convolutions really ran in bfloat16."""
    record = RecordLosses()
    conv_dtypes = set()
    conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, inputs, output: conv_dtypes.add(output.dtype))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[record],
    )
    trainer.fit(module, data)
    assert len(record.losses) == 3 and all(math.isfinite(loss) for loss in record.losses), record.losses
    assert conv_dtypes == {torch.bfloat16}
    return record


def test_expert_distillation_bf16_mixed(tiny_assets, tmp_path):
    module = ExpertDistillation(
        teacher_path=tiny_assets["classifier-resnet"],
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_experts=3,
        lora_rank=4,
        num_inference_steps=2,
        evaluator_path=None,
    )
    data = SynthesizedImageDataModule(
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_inference_steps=2,
        num_images=12,
        shard_size=12,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
        max_saturated_fraction=None,
    )
    fit_bf16(module, data, tmp_path, module.experts)
    # Master weights stay float32 under autocast; only the compute runs in bfloat16.
    assert all(p.dtype == torch.float32 for p in module.experts.parameters())


def test_diffusion_pretraining_bf16_mixed(tmp_path):
    torch.manual_seed(0)
    module = DiffusionPretraining(tiny_unet(), tiny_scheduler())
    fit_bf16(module, DigitsDataModule(batch_size=8), tmp_path, module.unet)
    assert all(p.dtype == torch.float32 for p in module.unet.parameters())


def guided_samples(pipeline: GuidedDiffusionPipeline) -> torch.Tensor:
    labels = torch.arange(4)
    return pipeline(
        class_labels=labels,
        num_inference_steps=4,
        classifier_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_autocast_runs_only_the_denoiser_in_bfloat16():
    """The UNet computes in bfloat16, the samples and the classifier's gradient stay float32, and samples move a little."""
    torch.manual_seed(0)
    unet, classifier = tiny_unet().eval(), TimmClassifier(**TINY_RESNET).eval()
    seen = {"unet": set(), "classifier": set()}
    for name, network in (("unet", unet), ("classifier", classifier)):
        conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda mod, inputs, output, name=name: seen[name].add(output.dtype))
    full = guided_samples(GuidedDiffusionPipeline(unet, tiny_scheduler(), NaiveClassifierGuidance(classifier)))
    for dtypes in seen.values():
        dtypes.clear()
    reduced = guided_samples(
        GuidedDiffusionPipeline(unet, tiny_scheduler(), NaiveClassifierGuidance(classifier), autocast_dtype="bfloat16")
    )
    assert seen == {"unet": {torch.bfloat16}, "classifier": {torch.float32}}
    assert reduced.dtype == torch.float32
    difference = (reduced - full).abs().max().item()
    assert 0 < difference < 0.1, difference


def test_compiled_unet_samples_as_the_eager_one(tiny_assets):
    """`compile_unet` compiles the forward in place: same class (the pipeline reads its config), same samples."""
    settings = dict(diffusion_model=tiny_assets["ddpm-uncond"], num_inference_steps=3, evaluator_path=None)
    eager, compiled = GuidedSampling(**settings), GuidedSampling(**settings, compile_unet=True)
    assert type(compiled.unet) is type(eager.unet) and compiled.unet._compiled_call_impl is not None
    with torch.no_grad():
        runs = [
            m.pipeline(
                batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt"
            ).images
            for m in (eager, compiled)
        ]
    torch.testing.assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5)


def test_synthesis_autocast_names_its_own_cache(tiny_assets, tmp_path):
    """Reduced-precision images are other images: they get another cache; compiling changes nothing but speed."""
    settings = dict(
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_inference_steps=2,
        num_images=8,
        shard_size=8,
        batch_size=4,
        cache_dir=str(tmp_path),
    )
    full = SynthesizedImageDataModule(**settings).fingerprint()
    assert SynthesizedImageDataModule(**settings, autocast_dtype="bfloat16").fingerprint() != full
    assert SynthesizedImageDataModule(**settings, compile_unet=True).fingerprint() == full
