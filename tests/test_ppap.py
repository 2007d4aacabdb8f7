"""PPAP: experts switch, BatchNorm statistics are per expert, the KL falls, guidance steers, saving round-trips."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

from plugguide.datamodules import SynthesizedImageDataModule
from plugguide.models import MultiExpertModel, TimmClassifier
from plugguide.models.multi_expert_model import expert_boundaries
from plugguide.modules import ExpertDistillation
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import ExpertGuidance, NaiveClassifierGuidance
from plugguide.pipelines.guided_diffusion import step_variance
from tests.conftest import TINY_DEIT, TINY_RESNET, learned_variance_model, tiny_scheduler, tiny_unet


def perturb(experts: MultiExpertModel, n: int, scale: float = 0.1) -> None:
    with torch.no_grad():
        for parameter in experts.expert_parameters(n):
            parameter.add_(scale * torch.randn_like(parameter))


@pytest.mark.parametrize("spec", [TINY_RESNET, TINY_DEIT], ids=["resnet", "deit"])
def test_merged_adapters_sample_as_the_unmerged_experts(spec, tmp_path):
    """Each expert's LoRA update merged into the weights at its switch: the same guided samples, and the weights come back."""
    torch.manual_seed(0)
    experts = MultiExpertModel(TimmClassifier(**spec), num_experts=3, lora_rank=4).eval()
    for n in range(3):
        perturb(experts, n)
    experts.save_pretrained(str(tmp_path / "experts"))
    before = {k: v.clone() for k, v in experts.state_dict().items()}
    unet, scheduler = tiny_unet(), DDIMScheduler.from_config(tiny_scheduler().config)
    samples = {}
    for merged, guidance in ((False, ExpertGuidance(experts)), (True, ExpertGuidance(str(tmp_path / "experts")))):
        assert guidance.classifier.merges_adapters is merged
        pipeline = GuidedDiffusionPipeline(unet, scheduler, guidance)
        pipeline.set_progress_bar_config(disable=True)
        samples[merged] = pipeline(
            class_labels=[1, 2],
            num_inference_steps=6,
            classifier_scale=20.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
    unguided = pipeline(
        class_labels=[1, 2], num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert (samples[False] - unguided).abs().max() > 1e-2  # the experts do steer
    torch.testing.assert_close(samples[True], samples[False], rtol=0, atol=1e-5)
    loaded = guidance.classifier
    lora_layers = [
        m for m in loaded.peft_model.modules() if hasattr(m, "merged_adapters") and getattr(m, "lora_A", None)
    ]
    assert lora_layers and all(
        m.merged_adapters == [loaded.expert_name(loaded.active_expert)] for m in lora_layers
    )  # no LoRA branch runs
    loaded.merge_adapters(False)
    assert all(not m.merged_adapters for m in lora_layers)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", [TINY_RESNET, TINY_DEIT], ids=["resnet", "deit"])
def test_merged_experts_give_each_noise_range_its_own_input_gradient(spec, tmp_path):
    """A batch spanning every noise range (a distillation teacher's t per example): merged experts give the unmerged
    experts' input gradients, and each sample's gradient is the one its expert gives it alone."""
    torch.manual_seed(0)
    experts = MultiExpertModel(TimmClassifier(**spec), num_experts=5, lora_rank=4).eval()
    for n in range(5):
        perturb(experts, n, scale=0.3)
    experts.save_pretrained(str(tmp_path / "experts"))
    x = torch.randn(10, spec["in_chans"], 16, 16)
    t = torch.arange(10) * 100 + 50  # two samples in each of the five ranges, interleaved with the others
    targets = torch.arange(10) % 3
    unmerged, merged = ExpertGuidance(experts), ExpertGuidance(str(tmp_path / "experts"))
    assert merged.classifier.merges_adapters and not unmerged.classifier.merges_adapters
    reference = unmerged.gradient(x, t, x, targets)
    alone = torch.cat(
        [merged.gradient(x[i : i + 1], t[i : i + 1], x[i : i + 1], targets[i : i + 1]) for i in range(10)]
    )
    mixed = merged.gradient(x, t, x, targets)
    scale = reference.abs().max()
    torch.testing.assert_close(alone / scale, reference / scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed / scale, reference / scale, rtol=0, atol=1e-5)
    single = merged.gradient(x[:1], t[:1], x[:1], targets[:1])  # single-range calls merge again afterwards
    assert merged.classifier.merged_expert == 0
    torch.testing.assert_close(single / scale, reference[:1] / scale, rtol=0, atol=1e-5)


def test_boundaries_split_the_timesteps_evenly():
    assert expert_boundaries(5, 1000) == [0, 200, 400, 600, 800, 1000]
    experts = MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=5)
    assert experts.expert_index(torch.tensor([0, 199, 200, 599, 600, 999])).tolist() == [0, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("spec", [TINY_RESNET, TINY_DEIT], ids=["resnet", "deit"])
def test_lora_experts_start_as_the_backbone_and_switch_without_touching_it(spec):
    torch.manual_seed(0)
    backbone = TimmClassifier(**spec).eval()
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        reference = backbone(images)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    experts = MultiExpertModel(backbone, num_experts=3, lora_rank=4).eval()
    early, late = torch.full((4,), 10), torch.full((4,), 900)
    torch.testing.assert_close(experts(images, early), reference)  # LoRA B = 0 at init: an exact no-op
    perturb(experts, 2)
    assert not torch.allclose(experts(images, late), experts(images, early))  # different experts, different outputs
    torch.testing.assert_close(experts(images, early), reference)  # expert 0 untouched by expert 2's change
    assert all(torch.equal(before[k], v) for k, v in experts.frozen_backbone().state_dict().items())


def test_batchnorm_running_statistics_are_per_expert():
    torch.manual_seed(0)
    experts = MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=2, lora_rank=4).train()
    experts(torch.randn(8, 1, 16, 16) * 5 + 3, torch.full((8,), 900))  # a train-mode pass of expert 1 only
    stats = {
        k: v
        for k, v in experts.state_dict().items()
        if k.endswith("model.bn1.modules_to_save.expert_0.running_mean")
        or k.endswith("model.bn1.modules_to_save.expert_1.running_mean")
        or k.endswith("model.bn1.original_module.running_mean")
    }
    values = {k.split("bn1.")[1].split(".running")[0]: v for k, v in stats.items()}
    assert torch.all(values["original_module"] == 0) and torch.all(values["modules_to_save.expert_0"] == 0)
    assert values["modules_to_save.expert_1"].abs().sum() > 0


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_experts_round_trip_through_save_pretrained(tmp_path, finetune):
    torch.manual_seed(0)
    experts = MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=3, finetune=finetune, lora_rank=4).eval()
    for n in range(3):
        perturb(experts, n)
    images, timesteps = torch.randn(6, 1, 16, 16), torch.tensor([0, 100, 400, 500, 800, 999])
    expected = experts(images, timesteps)
    experts.save_pretrained(str(tmp_path / "experts"))
    loaded = MultiExpertModel.from_pretrained(str(tmp_path / "experts"))
    torch.testing.assert_close(loaded(images, timesteps), expected)


def test_parameter_report_counts_lora_norms_and_head():
    backbone = TimmClassifier(**TINY_RESNET)
    total = sum(p.numel() for p in backbone.parameters())
    report = MultiExpertModel(backbone, num_experts=5, lora_rank=4).parameter_report()
    assert report["backbone_parameters"] == total
    assert (
        0 < report["trainable_per_expert"] < total and report["trainable_total"] == 5 * report["trainable_per_expert"]
    )
    full = MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=5, finetune="full").parameter_report()
    assert full["trainable_percent_of_backbone"] == pytest.approx(500.0)


def test_frozen_head_experts_share_the_off_the_shelf_head(tmp_path):
    torch.manual_seed(0)
    own = MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=3, lora_rank=2)
    torch.manual_seed(0)
    shared = MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=3, lora_rank=2, per_expert_head=False)
    head = sum(p.numel() for p in TimmClassifier(**TINY_RESNET).model.get_classifier().parameters())
    assert own.parameter_report()["trainable_total"] - shared.parameter_report()["trainable_total"] == 3 * head
    assert not any("fc" in name for name, _ in shared.peft_model.named_parameters() if ".modules_to_save." in name)
    shared.save_pretrained(str(tmp_path / "experts"))
    assert MultiExpertModel.from_pretrained(str(tmp_path / "experts")).config["per_expert_head"] is False


class ChainSnapshots(L.Callback):
    """Expert 0 as it ends (before step 2) and expert 1 as step 2 begins its update, for a chain of 2 x 2 steps."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            self.expert_0 = [p.detach().clone() for p in pl_module.experts.expert_parameters(0)]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 2:
            self.expert_1 = [p.detach().clone() for p in pl_module.experts.expert_parameters(1)]
            self.moments = [
                float(optimizer.state[p]["step"]) if "step" in optimizer.state[p] else None
                for p in pl_module.experts.expert_parameters(1)
            ]


def test_chained_experts_start_where_the_previous_expert_ended(tiny_assets, tmp_path):
    module = ExpertDistillation(
        teacher_path=tiny_assets["classifier-resnet"],
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_experts=2,
        lora_rank=4,
        evaluator_path=None,
        expert_schedule="chain",
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    data = SynthesizedImageDataModule(
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_inference_steps=2,
        num_images=16,
        shard_size=16,
        batch_size=4,
        cache_dir=str(tmp_path),
        max_saturated_fraction=None,
    )
    snapshots = ChainSnapshots()
    trainer = L.Trainer(
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[snapshots],
    )
    trainer.fit(module, data)
    assert [module.expert_at(step) for step in range(4)] == [0, 0, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(snapshots.expert_0, snapshots.expert_1))  # copied, not yet updated
    assert snapshots.moments == [2.0] * len(
        snapshots.moments
    )  # AdamW's moments came along (expert 1 never stepped itself)
    assert not all(
        torch.equal(a, b) for a, b in zip(module.experts.expert_parameters(0), module.experts.expert_parameters(1))
    )
    with pytest.raises(ValueError, match="max_steps"):
        L.Trainer(
            max_steps=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        ).fit(module, data)


def test_distillation_loss_falls_and_only_experts_change(tiny_assets):
    torch.manual_seed(0)
    module = ExpertDistillation(
        teacher_path=tiny_assets["classifier-resnet"],
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_experts=2,
        lora_rank=4,
        evaluator_path=None,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    module.train()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    backbone_before = {k: v.clone() for k, v in module.experts.frozen_backbone().state_dict().items()}
    optimizer = module.configure_optimizers()
    batch = {"image": torch.rand(32, 1, 16, 16) * 2 - 1}
    losses = []
    for step in range(30):
        x_t, t = module.noised(batch["image"], 0, torch.Generator().manual_seed(step % 3))
        loss = module.task.distillation_loss(module.teacher_outputs(batch), module.experts(x_t, t))
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in module.experts.expert_parameters(1))  # the inactive expert gets no gradient
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.experts.expert_parameters(0))
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert all(torch.equal(teacher_before[k], v) for k, v in module.teacher.state_dict().items())
    assert all(torch.equal(backbone_before[k], v) for k, v in module.experts.frozen_backbone().state_dict().items())


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler], ids=["ddpm", "ddim"])
def test_guided_sampling_runs_and_guidance_changes_the_samples(scheduler_class, tiny_classifier):
    pipeline = GuidedDiffusionPipeline(
        tiny_unet(), scheduler_class.from_config(tiny_scheduler().config), NaiveClassifierGuidance(tiny_classifier)
    )
    pipeline.set_progress_bar_config(disable=True)
    run = lambda scale: (
        pipeline(
            class_labels=[1, 2],
            num_inference_steps=3,
            classifier_scale=scale,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
    )
    unguided, guided = run(0.0), run(50.0)
    assert unguided.shape == (2, 1, 16, 16) and torch.all((0 <= guided) & (guided <= 1))
    assert not torch.allclose(unguided, guided)


def test_learned_variance_sampling_matches_diffusers_and_takes_the_guidance(tiny_classifier):
    unet, scheduler = learned_variance_model()
    pipeline = GuidedDiffusionPipeline(unet, scheduler, NaiveClassifierGuidance(tiny_classifier))
    pipeline.set_progress_bar_config(disable=True)
    run = lambda scale: (
        pipeline(
            class_labels=[1, 2],
            num_inference_steps=4,
            classifier_scale=scale,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
    )
    reference = DDPMPipeline(unet, scheduler)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert abs(run(0.0) - expected).max() < 1e-5  # the UNet's own variance is used, as diffusers uses it
    assert abs(run(50.0) - expected).max() > 1e-3


def test_learned_range_step_variance_is_the_one_diffusers_samples_with():
    _, scheduler = learned_variance_model()
    scheduler.set_timesteps(10)
    predicted = torch.rand(2, 1, 4, 4) * 2 - 1
    for t in (900, 500, 0):
        torch.testing.assert_close(step_variance(scheduler, t, predicted), scheduler._get_variance(t, predicted).exp())
    assert step_variance(scheduler, 500) == pytest.approx(
        float(scheduler._get_variance(500, variance_type="fixed_small"))
    )


def test_learned_variance_schedule_needs_a_unet_that_predicts_it():
    with pytest.raises(ValueError, match="variance_type='learned_range'.*1 output channels"):
        GuidedDiffusionPipeline(tiny_unet(), learned_variance_model()[1])


def test_guidance_moves_a_judge_toward_the_target():
    """With a strong 'expert' the guided sample is read as the target by that classifier far more often."""
    torch.manual_seed(0)
    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    judge.num_classes = 10
    pipeline = GuidedDiffusionPipeline(
        tiny_unet(), DDPMScheduler.from_config(tiny_scheduler().config), NaiveClassifierGuidance(judge)
    )
    pipeline.set_progress_bar_config(disable=True)
    targets = torch.arange(10).repeat(2)
    hits = {}
    for scale in (0.0, 20.0):
        images = pipeline(
            class_labels=targets,
            num_inference_steps=10,
            classifier_scale=scale,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
        hits[scale] = (judge(images * 2 - 1).argmax(-1) == targets).float().mean().item()
    assert hits[20.0] >= 0.8 and hits[20.0] > hits[0.0] + 0.5


def test_expert_guidance_routes_each_step_to_its_expert():
    torch.manual_seed(0)
    experts = MultiExpertModel(TimmClassifier(**TINY_RESNET), num_experts=2, lora_rank=4)
    perturb(experts, 1, 0.5)
    guidance = ExpertGuidance(experts)
    images, targets = torch.randn(2, 1, 16, 16), torch.tensor([3, 3])
    early = guidance.gradient(images, torch.tensor([10, 10]), images, targets)
    late = guidance.gradient(images, torch.tensor([900, 900]), images, targets)
    assert early.abs().sum() > 0 and not torch.allclose(early, late)


def test_non_finite_gradients_name_the_timestep():
    class Broken(torch.nn.Module):
        num_classes = 10

        def forward(self, x):
            return x.flatten(1)[:, :10] * float("nan")

    guidance = NaiveClassifierGuidance(Broken())
    with pytest.raises(FloatingPointError, match="timestep 321"):
        guidance.gradient(torch.randn(1, 1, 16, 16), torch.tensor([321]), torch.randn(1, 1, 16, 16), torch.tensor([0]))
    clipped = NaiveClassifierGuidance(Broken(), clip_gradient=1.0).gradient(
        torch.randn(1, 1, 16, 16), torch.tensor([321]), torch.randn(1, 1, 16, 16), torch.tensor([0])
    )
    assert torch.all(clipped == 0)


def test_no_guidance_or_expert_wrapper_changes_the_module_it_is_handed():
    """A guide handed a network that is still training leaves it training: same mode, same trainable parameters, same
    BatchNorm statistics, while each guidance call runs it in eval mode."""
    from plugguide.pipelines.guidance import CalibratedGuidance, PredictedCleanImageGuidance

    torch.manual_seed(0)
    classifier = TimmClassifier(**TINY_RESNET).train()
    experts = MultiExpertModel(classifier, num_experts=2, lora_rank=2).train()
    builders = {
        "naive": lambda: NaiveClassifierGuidance(classifier),
        "x0_hat": lambda: PredictedCleanImageGuidance(classifier),
        "calibrated": lambda: CalibratedGuidance(classifier, softplus_beta=None),
        "experts": lambda: ExpertGuidance(experts),
    }
    for name, build in builders.items():
        handed = experts if name == "experts" else classifier
        trainable = [p.requires_grad for p in handed.parameters()]
        statistics = {k: v.clone() for k, v in handed.state_dict().items() if "running" in k}
        guidance = build()
        x = torch.randn(3, 1, 16, 16)
        guidance.gradient(x, torch.tensor([10, 500, 900]), x, torch.tensor([1, 2, 3]))
        assert handed.training and all(m.training for m in handed.modules()), name
        assert [p.requires_grad for p in handed.parameters()] == trainable and any(trainable), name
        for key, value in statistics.items():  # eval mode inside the call: running statistics untouched
            torch.testing.assert_close(handed.state_dict()[key], value, rtol=0, atol=0, msg=f"{name}: {key}")
    assert all(p.requires_grad for p in classifier.parameters())  # MultiExpertModel froze a copy, not this one
