"""Exact resume: a run that crashes mid-epoch and resumes from last.ckpt ends where an uninterrupted run ends."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from plugguide.callbacks import GuidedSampleGrid
from plugguide.datamodules import DigitsDataModule, SynthesizedImageDataModule
from plugguide.datamodules.resumable_loader import ResumableDataLoader
from plugguide.models import TimmClassifier
from plugguide.models.guides import TinyGuide
from plugguide.modules import ClassifierPretraining, DiffusionPretraining, ExpertDistillation
from plugguide.modules.guide_distillation import GuideDistillation
from plugguide.modules.progressive_halving import ProgressiveHalving
from tests.conftest import TINY_RESNET, tiny_scheduler, tiny_unet

TOTAL_STEPS = 10  # 24 images / batch 4 = 6 steps per epoch: the crash is mid-epoch 0, the end in epoch 1
CRASH_AFTER = 5


class Crash(Exception):
    pass


class CrashAfter(L.Callback):
    """Raises once `steps` optimizer steps are done and checkpointed, like a killed job."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.steps:
            raise Crash(f"injected crash before step {self.steps + 1}")


class RecordBatches(L.Callback):
    """The `index` (or first pixel) of every training batch, to show which data each step saw."""

    def __init__(self) -> None:
        self.seen: list[list] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        key = batch["index"] if "index" in batch else batch["image"].flatten(1)[:, :4].sum(1)
        self.seen.append(key.tolist())


def trainer(tmp_path, max_steps: int, *callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1, save_top_k=0),
            *callbacks,
        ],
    )


def run_straight_and_resumed(
    tmp_path, make_module, make_data, *callbacks_factory
) -> tuple[L.LightningModule, L.LightningModule, RecordBatches, RecordBatches]:
    """Fits TOTAL_STEPS steps at once, and CRASH_AFTER steps, a crash, then a resume from last.ckpt to TOTAL_STEPS."""
    torch.manual_seed(0)
    straight, straight_batches = make_module(), RecordBatches()
    torch.manual_seed(101)  # global RNG state differs between the runs: training must not depend on it
    trainer(tmp_path / "straight", TOTAL_STEPS, straight_batches, *[f() for f in callbacks_factory]).fit(
        straight, make_data()
    )

    torch.manual_seed(0)
    crashed, resumed_batches = make_module(), RecordBatches()
    torch.manual_seed(202)
    with pytest.raises(Crash):
        trainer(
            tmp_path / "crashed",
            TOTAL_STEPS,
            CrashAfter(CRASH_AFTER),
            resumed_batches,
            *[f() for f in callbacks_factory],
        ).fit(crashed, make_data())
    last = tmp_path / "crashed/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == CRASH_AFTER
    torch.manual_seed(1)
    resumed = make_module()  # a fresh process would build the module from the config again
    torch.manual_seed(303)
    trainer(tmp_path / "crashed", TOTAL_STEPS, resumed_batches, *[f(resumed=True) for f in callbacks_factory]).fit(
        resumed, make_data(), ckpt_path=str(last)
    )
    return straight, resumed, straight_batches, resumed_batches


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference over all trainable parameters and buffers (BatchNorm statistics)."""
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    return max(
        (state_a[k].double() - state_b[k].double()).abs().max().item()
        for k in state_a
        if state_a[k].is_floating_point()
    )


@pytest.mark.parametrize("schedule", ["round_robin", "chain"])
def test_expert_distillation_resumes_exactly_mid_epoch(tiny_assets, tmp_path, monkeypatch, schedule):
    grids = []
    import plugguide.callbacks.sample_grid as sample_grid

    original = sample_grid.labelled_grid
    monkeypatch.setattr(
        sample_grid, "labelled_grid", lambda images, **kw: (grids.append(images.clone()), original(images, **kw))[1]
    )

    def make_module():
        return ExpertDistillation(
            teacher_path=tiny_assets["classifier-resnet"],
            diffusion_model=tiny_assets["ddpm-uncond"],
            num_experts=3,
            lora_rank=4,
            num_inference_steps=2,
            classifier_scale=1.0,
            evaluator_path=None,
            seed=7,
            expert_schedule=schedule,
        )  # chain: 4 steps per expert, so the crash falls inside expert 1 and expert 2 starts after the resume

    def make_data():
        return SynthesizedImageDataModule(
            diffusion_model=tiny_assets["ddpm-uncond"],
            num_inference_steps=2,
            num_images=24,
            shard_size=12,
            batch_size=4,
            cache_dir=str(tmp_path / "cache"),
            teacher_path=tiny_assets["classifier-resnet"],
            max_saturated_fraction=None,
        )

    def make_grid_callback(resumed: bool = False):
        return GuidedSampleGrid(num_per_class=1, num_classes=3, num_inference_steps=2, seed=0 if resumed else 5)

    straight, resumed, straight_batches, resumed_batches = run_straight_and_resumed(
        tmp_path, make_module, make_data, make_grid_callback
    )
    # The resumed run saw the same batches, in the same order, as the straight one.
    assert resumed_batches.seen == straight_batches.seen and len(straight_batches.seen) == TOTAL_STEPS
    assert sorted(sum(straight_batches.seen[:6], [])) == list(range(24))  # epoch 0: every image once
    difference = max_difference(straight.experts, resumed.experts)
    print(f"expert distillation: max |straight - resumed| = {difference:.3g}")
    assert difference <= 1e-6, f"resumed experts differ from the uninterrupted run by {difference}"
    # Fixed grid noise survives the resume: the final grids of both runs are the same images.
    # (the resumed run's callback is configured with another seed: the checkpoint's seed wins)
    assert len(grids) == 2  # fit end of the straight and of the resumed run (no validation epochs here)
    torch.testing.assert_close(grids[1], grids[0])


@pytest.mark.parametrize("job", ["diffusion", "classifier"])
def test_pretraining_resumes_exactly_mid_epoch(tmp_path, job):
    def make_module():
        if job == "diffusion":
            return DiffusionPretraining(tiny_unet(), tiny_scheduler(), seed=3)
        return ClassifierPretraining(
            TimmClassifier(**TINY_RESNET), noise_std=0.2, max_shift=1, seed=3
        )  # random augmentation

    def make_data():
        return DigitsDataModule(batch_size=4, image_size=16)

    straight, resumed, straight_batches, resumed_batches = run_straight_and_resumed(tmp_path, make_module, make_data)
    assert resumed_batches.seen == straight_batches.seen
    difference = max_difference(straight, resumed)
    print(f"{job} pretraining: max |straight - resumed| = {difference:.3g}")
    assert difference <= 1e-6, f"resumed {job} model differs from the uninterrupted run by {difference}"


def test_loader_resumes_mid_epoch_and_shards_per_rank():
    data = list(range(20))
    full = ResumableDataLoader(data, batch_size=3, seed=1)
    full.sampler.set_epoch(2)
    order = [b.tolist() for b in full]
    assert len(order) == 6 and sorted(sum(order, [])) != list(range(18))  # shuffled, 2 left over
    interrupted = ResumableDataLoader(data, batch_size=3, seed=1)
    interrupted.sampler.set_epoch(2)
    iterator = iter(interrupted)
    assert [next(iterator).tolist() for _ in range(2)] == order[:2]
    state = interrupted.state_dict()
    resumed = ResumableDataLoader(data, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert [b.tolist() for b in resumed] == order[2:]
    assert [b.tolist() for b in resumed] == order  # the offset applies to one epoch only
    ranks = [
        [i for b in ResumableDataLoader(data, batch_size=2, seed=1, num_replicas=2, rank=r) for i in b.tolist()]
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 10 and not set(ranks[0]) & set(ranks[1])


def test_loader_pins_memory_when_cuda_is_there(monkeypatch):
    assert ResumableDataLoader(list(range(4))).pin_memory == torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ResumableDataLoader(list(range(4))).pin_memory
    assert not ResumableDataLoader(list(range(4)), pin_memory=False).pin_memory  # an explicit setting wins


@pytest.mark.parametrize("job", ["guide_distillation", "progressive_halving"])
def test_guide_jobs_resume_exactly_mid_epoch(tiny_assets, tmp_path, job):
    guide_root = tmp_path / "guides"
    torch.manual_seed(0)
    from plugguide.models.diffusion_model import load_unet

    teacher = TinyGuide(load_unet(tiny_assets["ddpm-cond"]), hidden_dim=8)
    for parameter in teacher.parameters():
        torch.nn.init.normal_(parameter.data, std=0.05)  # a "trained" teacher guide for the halving stage
    teacher.save_pretrained(str(guide_root / "tiny" / "steps-4"))

    def make_module():
        if job == "guide_distillation":
            return GuideDistillation(
                guide=lambda unet: TinyGuide(unet, hidden_dim=8),
                diffusion_model=tiny_assets["ddpm-cond"],
                num_inference_steps=4,
            )
        return ProgressiveHalving(
            guide_root=str(guide_root), guide_name="tiny", teacher_steps=4, diffusion_model=tiny_assets["ddpm-cond"]
        )

    def make_data():
        return DigitsDataModule(batch_size=4, image_size=16)

    straight, resumed, straight_batches, resumed_batches = run_straight_and_resumed(tmp_path, make_module, make_data)
    assert resumed_batches.seen == straight_batches.seen
    difference = max_difference(straight.guide, resumed.guide)
    print(f"{job}: max |straight - resumed| = {difference:.3g}")
    assert difference <= 1e-6, f"resumed {job} guide differs from the uninterrupted run by {difference}"
