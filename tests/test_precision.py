"""Mixed precision: training jobs run a few steps with `precision="bf16-mixed"` on CPU with finite losses."""

from __future__ import annotations

import math

import lightning as L
import torch

from plugguide.datamodules import DigitsDataModule, SynthesizedImageDataModule
from plugguide.modules import DiffusionPretraining, ExpertDistillation
from tests.conftest import tiny_scheduler, tiny_unet


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_bf16(module: L.LightningModule, data: L.LightningDataModule, tmp_path, network: torch.nn.Module) -> RecordLosses:
    """Three bf16-mixed steps; asserts finite losses and that `network`'s convolutions really ran in bfloat16."""
    record = RecordLosses()
    conv_dtypes = set()
    conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, inputs, output: conv_dtypes.add(output.dtype))
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=3, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[record],
    )
    trainer.fit(module, data)
    assert len(record.losses) == 3 and all(math.isfinite(loss) for loss in record.losses), record.losses
    assert conv_dtypes == {torch.bfloat16}
    return record


def test_expert_distillation_bf16_mixed(tiny_assets, tmp_path):
    module = ExpertDistillation(
        teacher_path=tiny_assets["classifier-resnet"], diffusion_model=tiny_assets["ddpm-uncond"], num_experts=3, lora_rank=4,
        num_inference_steps=2, evaluator_path=None,
    )
    data = SynthesizedImageDataModule(diffusion_model=tiny_assets["ddpm-uncond"], num_inference_steps=2, num_images=12, shard_size=12, batch_size=4, cache_dir=str(tmp_path / "cache"))
    fit_bf16(module, data, tmp_path, module.experts)
    # Master weights stay float32 under autocast; only the compute runs in bfloat16.
    assert all(p.dtype == torch.float32 for p in module.experts.parameters())


def test_diffusion_pretraining_bf16_mixed(tmp_path):
    torch.manual_seed(0)
    module = DiffusionPretraining(tiny_unet(), tiny_scheduler())
    fit_bf16(module, DigitsDataModule(batch_size=8), tmp_path, module.unet)
    assert all(p.dtype == torch.float32 for p in module.unet.parameters())
