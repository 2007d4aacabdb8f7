"""PPAP beyond classification: tasks, dense experts, dense guidance, target maps and their scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from plugguide.datamodules import DigitMapsDataModule, TargetMapDataModule
from plugguide.metrics import DenseMapMetrics, digit_segmentation, distance_to_stroke, majority_digit, stroke_mask
from plugguide.models import DenseModel, MultiExpertModel, load_off_the_shelf
from plugguide.modules import ExpertDistillation
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import CalibratedGuidance, ExpertGuidance, NaiveClassifierGuidance
from plugguide.pipelines.tasks import ClassificationTask, DenseRegressionTask, SegmentationTask, default_task
from tests.conftest import TINY_DEPTH, TINY_SEGMENTER, tiny_imagenet_overrides, tiny_scheduler, tiny_unet
from tests.test_cli import run, sampling_overrides
from tests.test_ppap import perturb


def per_pixel(outputs: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B H W, C): every pixel as a sample of a classifier."""
    return outputs.permute(0, 2, 3, 1).reshape(-1, outputs.shape[1])


def test_classification_task_is_the_papers_kl_and_the_log_softmax_at_the_target():
    torch.manual_seed(0)
    teacher, student, targets = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    task = ClassificationTask(temperature=0.25)
    expected = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher / 0.25, -1), reduction="batchmean")
    torch.testing.assert_close(task.distillation_loss(teacher, student), expected)
    torch.testing.assert_close(
        task.log_likelihood(student, targets), F.log_softmax(student, -1)[torch.arange(4), targets]
    )


def test_segmentation_is_the_classification_loss_and_log_likelihood_at_every_pixel():
    torch.manual_seed(0)
    teacher, student, targets = torch.randn(2, 11, 3, 5), torch.randn(2, 11, 3, 5), torch.randint(0, 11, (2, 3, 5))
    classification, segmentation = ClassificationTask(0.25), SegmentationTask(0.25)
    torch.testing.assert_close(
        segmentation.distillation_loss(teacher, student),
        classification.distillation_loss(per_pixel(teacher), per_pixel(student)),
    )
    per_pixel_log_likelihood = classification.log_likelihood(per_pixel(student), targets.flatten()).view(2, 15).sum(1)
    torch.testing.assert_close(segmentation.log_likelihood(student, targets), per_pixel_log_likelihood)
    tempered = (
        classification.log_likelihood(per_pixel(student), targets.flatten(), marginal_ratio=0.5).view(2, 15).sum(1)
    )
    torch.testing.assert_close(segmentation.log_likelihood(student, targets, marginal_ratio=0.5), tempered)


def test_scale_and_shift_invariant_loss_ignores_a_maps_scale_and_shift_and_mse_does_not():
    torch.manual_seed(0)
    target = torch.randn(3, 8, 8)
    rescaled = 2.5 * target - 1.0
    assert DenseRegressionTask("ssi").distillation_loss(target, rescaled) < 1e-10
    assert DenseRegressionTask("mse").distillation_loss(target, rescaled) > 1.0
    noisy = rescaled + 0.3 * torch.randn_like(target)
    assert DenseRegressionTask("ssi").distillation_loss(target, noisy) > 1e-3
    # Guidance: minus the loss, per sample.
    torch.testing.assert_close(
        DenseRegressionTask("mse").log_likelihood(noisy, target), -(noisy - target).square().flatten(1).sum(1)
    )


@pytest.mark.parametrize(
    ("task", "targets", "named"),
    [
        (ClassificationTask(), torch.zeros(2, 4, 4, dtype=torch.long), "class_labels"),
        (SegmentationTask(), torch.tensor([1, 2]), "label map"),
        (SegmentationTask(), torch.full((2, 4, 4), 11), "0..10"),
        (DenseRegressionTask(), torch.zeros(2, 4, 4, dtype=torch.long), "real-valued map"),
        (DenseRegressionTask(), torch.full((2, 4, 4), float("nan")), "NaN"),
    ],
    ids=[
        "classifier-toward-maps",
        "segmenter-toward-classes",
        "segmenter-class-beyond",
        "regressor-toward-labels",
        "regressor-toward-nan",
    ],
)
def test_a_task_refuses_targets_of_another_kind_naming_them(task, targets, named):
    with pytest.raises(ValueError, match="`targets`|`class_labels`") as info:
        task.check_targets(targets, 11)
    assert named in str(info.value)


def test_a_models_own_task_follows_what_it_predicts(tiny_assets):
    assert isinstance(default_task(load_off_the_shelf(tiny_assets["segmenter"])), SegmentationTask)
    assert isinstance(default_task(load_off_the_shelf(tiny_assets["depth"])), DenseRegressionTask)
    assert type(default_task(load_off_the_shelf(tiny_assets["classifier-resnet"]))) is ClassificationTask
    experts = MultiExpertModel(load_off_the_shelf(tiny_assets["depth"]), num_experts=2, lora_rank=2)
    assert isinstance(ExpertGuidance(experts).task, DenseRegressionTask)


@pytest.mark.parametrize("spec", [TINY_SEGMENTER, TINY_DEPTH], ids=["segmenter", "depth"])
def test_dense_experts_switch_adapters_by_timestep_like_the_classifier_experts(spec, tmp_path):
    torch.manual_seed(0)
    backbone = DenseModel(**spec).eval()
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        reference = backbone(images)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    experts = MultiExpertModel(backbone, num_experts=3, lora_rank=4).eval()
    adapted = {
        name.removesuffix(".lora_A.expert_0")
        for name, _ in experts.named_modules()
        if name.endswith(".lora_A.expert_0")
    }
    assert any(".encoder.model.layer1.0.conv1" in name for name in adapted) and any(
        ".decoder.blocks.0.conv1.0" in name for name in adapted
    )
    early, late = torch.full((4,), 10), torch.full((4,), 900)
    torch.testing.assert_close(experts(images, early), reference)  # LoRA B = 0 at init: an exact no-op
    perturb(experts, 2)
    late_outputs = experts(images, late)
    assert late_outputs.shape == reference.shape and not torch.allclose(late_outputs, reference)
    torch.testing.assert_close(experts(images, early), reference)  # expert 0 untouched by expert 2's change
    mixed = experts(images, torch.tensor([10, 900, 10, 900]))  # each sample routed to the expert of its timestep
    torch.testing.assert_close(mixed[0::2], reference[0::2])
    torch.testing.assert_close(mixed[1::2], late_outputs[1::2])
    assert all(torch.equal(before[k], v) for k, v in experts.frozen_backbone().state_dict().items())
    experts.save_pretrained(str(tmp_path / "experts"))
    loaded = MultiExpertModel.from_pretrained(str(tmp_path / "experts"))
    torch.testing.assert_close(loaded(images, torch.tensor([10, 900, 10, 900])), mixed)


def test_per_pixel_kl_falls_on_a_tiny_run_and_only_the_experts_change(tiny_assets):
    torch.manual_seed(0)
    module = ExpertDistillation(
        teacher_path=tiny_assets["segmenter"],
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_experts=2,
        lora_rank=4,
        task=SegmentationTask(0.25),
        evaluator_path=None,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    module.train()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    optimizer = module.configure_optimizers()
    batch = {
        "image": torch.rand(16, 1, 16, 16) * 2 - 1,
        "teacher_logits": torch.randn(16, 10),
    }  # a classifier's cached logits are not read
    losses = []
    for step in range(30):
        x_t, t = module.noised(batch["image"], 0, torch.Generator().manual_seed(step % 3))
        outputs = module.experts(x_t, t)
        loss = module.task.distillation_loss(module.teacher_outputs(batch), outputs)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in module.experts.expert_parameters(1))  # the inactive expert gets no gradient
        optimizer.step()
        losses.append(loss.item())
    assert outputs.shape == (16, 11, 16, 16)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert all(torch.equal(teacher_before[k], v) for k, v in module.teacher.state_dict().items())


class PixelSegmenter(torch.nn.Module):
    """A 2-class segmenter that reads a pixel as stroke exactly when it is bright: logits (0, 4 x)."""

    num_classes = 2
    predicts = "class_map"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(images), 4 * images], dim=1)


class PixelDepth(torch.nn.Module):
    """A regressor whose map is the image itself: guiding it toward a map guides the pixels."""

    num_classes = None
    predicts = "map"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0]


@pytest.mark.parametrize("guide", [PixelSegmenter(), PixelDepth()], ids=["segmentation", "depth"])
def test_a_strong_dense_guide_moves_a_samples_map_toward_the_target(guide):
    """Read off the samples' own pixels (never by the guide): strokes where the target map has them."""
    torch.manual_seed(0)
    pattern = torch.zeros(4, 16, 16, dtype=torch.bool)
    pattern[0, 4:12, 7:9] = pattern[1, 7:9, 3:13] = pattern[2, 3:6, 3:13] = pattern[3, 10:14, 2:14] = True
    targets = pattern.long() if guide.predicts == "class_map" else torch.where(pattern, 1.0, -1.0)
    pipeline = GuidedDiffusionPipeline(
        tiny_unet(), DDPMScheduler.from_config(tiny_scheduler().config), NaiveClassifierGuidance(guide)
    )
    pipeline.set_progress_bar_config(disable=True)
    overlap = {}
    for scale in (0.0, 3.0):
        images = pipeline(
            targets=targets,
            num_inference_steps=10,
            classifier_scale=scale,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
        strokes = stroke_mask(images * 2 - 1)
        overlap[scale] = (
            ((strokes & pattern).flatten(1).sum(1) / (strokes | pattern).flatten(1).sum(1).clamp_min(1)).mean().item()
        )
    assert overlap[3.0] > 0.8 and overlap[3.0] > overlap[0.0] + 0.5


def test_calibrated_guidance_takes_temperatures_per_pixel_and_refuses_them_for_a_regressor(tiny_assets):
    segmenter, depth = load_off_the_shelf(tiny_assets["segmenter"]), load_off_the_shelf(tiny_assets["depth"])
    images, maps = torch.randn(2, 1, 16, 16), torch.randint(0, 11, (2, 16, 16))
    guidance = CalibratedGuidance(segmenter, softplus_beta=None, marginal_discount=0.5, sine_gamma=0.0)
    logits = segmenter(images)
    expected = (logits.gather(1, maps[:, None])[:, 0] - torch.logsumexp(0.5 * logits, dim=1)).flatten(1).sum(1)
    torch.testing.assert_close(guidance.log_likelihood(images, torch.tensor([5, 5]), maps), expected)
    with pytest.raises(ValueError, match="`joint_temperature` and `marginal_discount`"):
        CalibratedGuidance(depth)  # the default marginal discount is 0.5
    plain = CalibratedGuidance(
        depth, marginal_discount=1.0, sine_gamma=0.0
    )  # Softplus, x0_hat: what applies to a regressor
    assert (
        plain.input == "x0_hat"
        and plain.gradient(images, torch.tensor([5, 5]), images, torch.randn(2, 16, 16)).abs().sum() > 0
    )


def test_digit_maps_label_strokes_with_their_digit_and_measure_the_distance_to_them():
    data = DigitMapsDataModule(batch_size=16)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    strokes = stroke_mask(batch["image"])
    assert torch.equal(batch["segmentation"], torch.where(strokes, batch["label"].view(-1, 1, 1) + 1, 0))
    assert torch.equal(batch["depth"] == 0, strokes) and bool((batch["depth"][~strokes] >= 1).all())
    assert torch.equal(majority_digit(batch["segmentation"]), batch["label"])
    assert torch.equal(majority_digit(torch.zeros(1, 4, 4, dtype=torch.long)), torch.tensor([-1]))


def test_map_metrics_score_a_digit_against_its_own_maps_as_perfect_and_a_moved_digit_lower():
    data = DigitMapsDataModule(batch_size=20)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    images, labels = batch["image"], batch["label"]
    moved = torch.roll(images, shifts=3, dims=-1)

    class Oracle(torch.nn.Module):  # an evaluator that reads every digit right
        def forward(self, x):
            return F.one_hot(labels, 10).float()

    segmentation = DenseMapMetrics("segmentation", Oracle())
    own, shifted = (
        segmentation.scores(images, digit_segmentation(images, labels)),
        segmentation.scores(moved, digit_segmentation(images, labels)),
    )
    assert torch.allclose(own["miou"], torch.ones(20)) and torch.allclose(own["stroke_iou"], torch.ones(20))
    assert shifted["stroke_iou"].mean() < 0.6 and shifted["miou"].mean() < own["miou"].mean()
    depth = DenseMapMetrics("depth")
    own, shifted = depth.scores(images, distance_to_stroke(images)), depth.scores(moved, distance_to_stroke(images))
    assert torch.allclose(own["depth_mae"], torch.zeros(20)) and torch.allclose(
        own["depth_correlation"], torch.ones(20)
    )
    assert shifted["depth_mae"].mean() > 0.5 and shifted["depth_correlation"].mean() < 0.8
    depth.update(images, distance_to_stroke(images), torch.arange(20))
    depth.update(
        images[:5], distance_to_stroke(images[:5]), torch.arange(5)
    )  # repeated samples (DDP padding) count once
    assert depth.compute()["depth_correlation"] == pytest.approx(1.0) and len(depth.per_sample()["index"]) == 20


def test_target_maps_are_the_dense_models_view_of_held_out_digits(tiny_assets):
    data = TargetMapDataModule(
        model_path=tiny_assets["segmenter"], splits=["val", "test"], num_samples=200, batch_size=64, seed=7
    )
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    model = load_off_the_shelf(tiny_assets["segmenter"])
    with torch.no_grad():
        expected = model(batch["source_image"]).argmax(1)
    assert torch.equal(batch["target_map"], expected) and torch.equal(batch["target_class"], majority_digit(expected))
    assert batch["seed"].tolist() == list(range(7, 71)) and batch["label"].eq(-1).all() and len(data.dataset) == 200
    depth = TargetMapDataModule(model_path=tiny_assets["depth"], num_samples=5)
    depth.setup("predict")
    labels = torch.as_tensor(depth.labelled_data.load_splits()["test"].with_format(None)["label"][:5])
    assert depth.dataset.rows["target_map"].dtype == torch.float32 and torch.equal(
        depth.dataset.rows["target_class"], labels
    )


@pytest.mark.parametrize("model", ["segmenter", "depth"])
def test_the_sampling_job_guides_toward_target_maps_and_they_round_trip_through_samples_npz(
    model, tiny_assets, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    job = {
        "diffusion_model": tiny_assets["ddpm-uncond"],
        "num_inference_steps": 2,
        "classifier_scale": 5.0,
        "evaluator_path": tiny_assets["evaluator"],
        "guidance": {
            "class_path": "plugguide.pipelines.guidance.NaiveClassifierGuidance",
            "init_args": {"classifier": tiny_assets[model]},
        },
    }
    data = {"model_path": tiny_assets[model], "num_samples": 5, "batch_size": 3}
    overrides = sampling_overrides(tmp_path, job, data, data_class="plugguide.datamodules.TargetMapDataModule", nrow=3)
    run("predict", "sample.yaml", overrides, tmp_path)
    written = np.load(tmp_path / "out/samples.npz")
    data = TargetMapDataModule(model_path=tiny_assets[model], num_samples=5)
    data.setup("predict")
    expected = data.dataset.rows["target_map"].numpy()
    assert written["images"].shape == (5, 1, 16, 16) and written["target_maps"].shape == (5, 16, 16)
    assert written["target_maps"].dtype == expected.dtype and np.array_equal(written["target_maps"], expected)


def dense_overrides(assets: dict, teacher: str) -> dict:
    return {
        "trainer": {
            "max_steps": 6,
            "check_val_every_n_epoch": 1,
            "limit_val_batches": 1,
            "limit_test_batches": 1,
            "enable_progress_bar": False,
        },
        "model": {
            "init_args": {
                "teacher_path": assets[teacher],
                "diffusion_model": assets["ddpm-uncond"],
                "evaluator_path": assets["evaluator"],
                "autoencoder_path": assets["autoencoder"],
                "num_inference_steps": 2,
                "lora_rank": 4,
            }
        },
        "data": {
            "init_args": {
                "num_images": 20,
                "num_inference_steps": 3,
                "batch_size": 4,
                "shard_size": 10,
                "max_saturated_fraction": None,
                "labelled_data": {
                    "class_path": "plugguide.datamodules.DigitsDataModule",
                    "init_args": {"batch_size": 8},
                },
            }
        },
    }


@pytest.mark.parametrize(
    ("config", "teacher"),
    [("ppap_segmentation.yaml", "segmenter"), ("ppap_depth.yaml", "depth")],
    ids=["segmentation", "depth"],
)
def test_dense_ppap_configs_fit_export_log_target_map_grids_and_test(
    config, teacher, tiny_assets, tmp_path, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    overrides = dense_overrides(tiny_assets, teacher)
    run("fit", config, overrides, tmp_path)
    name = config.removesuffix(".yaml").replace("_", "-")
    assert (tmp_path / f"runs/{name}/version_0/experts/experts.json").is_file()
    experts = MultiExpertModel.from_pretrained(str(tmp_path / f"runs/{name}/version_0/experts"))
    assert experts.predicts == ("class_map" if teacher == "segmenter" else "map")
    events = EventAccumulator(str(next((tmp_path / "runs" / name).rglob("events.out.tfevents*")))).Reload()
    assert f"{name}/target_maps" in events.Tags()["images"]
    scalars = events.Tags()["scalars"]
    assert all(f"train/expert_{n}/loss" in scalars for n in range(5)) and "val/expert_0/agreement" in scalars
    run("test", config, overrides, tmp_path, "--ckpt_path", "last")


@pytest.fixture(scope="module")
def hub_dense_models(tmp_path_factory) -> dict[str, str]:
    """Random models of the hub configs' classes, saved as DenseModels: torchvision's DeepLabV3-ResNet50 (its real size:
    torchvision fixes its widths) and a tiny transformers DPTForDepthEstimation, with hub-style preprocessing."""
    root = tmp_path_factory.mktemp("dense-hub")
    imagenet = dict(in_chans=3, input_mean=[0.485, 0.456, 0.406], input_std=[0.229, 0.224, 0.225])
    torch.manual_seed(0)
    DenseModel("torchvision", "deeplabv3_resnet50", num_classes=21, input_size=64, **imagenet).save_pretrained(
        str(root / "deeplabv3")
    )
    dpt = dict(
        model_type="dpt",
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
        backbone_out_indices=[0, 1, 2, 3],
    )
    DenseModel(
        "transformers", "DPTForDepthEstimation", num_classes=None, model_kwargs=dpt, input_size=32, **imagenet
    ).save_pretrained(str(root / "dpt"))
    return {"deeplabv3": str(root / "deeplabv3"), "dpt": str(root / "dpt")}


@pytest.mark.parametrize("name", ["deeplabv3", "dpt"])
def test_hub_dense_models_load_by_path_and_make_experts_with_their_default_lora_targets(name, hub_dense_models):
    model = load_off_the_shelf(hub_dense_models[name], "teacher_path").eval()
    images = torch.rand(2, 3, 24, 24) * 2 - 1  # resized to the model's input size inside, outputs back at 24x24
    with torch.no_grad():
        outputs = model(images)
    assert outputs.shape == ((2, 21, 24, 24) if name == "deeplabv3" else (2, 24, 24))
    experts = MultiExpertModel(model, num_experts=2, lora_rank=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(experts(images, torch.tensor([10, 900])), outputs)
    perturb(experts, 1)
    guidance = ExpertGuidance(experts)
    targets = outputs.argmax(1) if name == "deeplabv3" else outputs
    early = guidance.gradient(images, torch.tensor([10, 10]), images, targets)
    late = guidance.gradient(images, torch.tensor([900, 900]), images, targets)
    assert early.shape == images.shape and late.abs().sum() > 0 and not torch.allclose(early, late)


def test_depth_hub_config_runs_on_tiny_models_of_the_same_classes(
    hub_dense_models, imagenet_like, tmp_path, monkeypatch
):
    """configs/hub/ppap_depth_imagenet256.yaml with a tiny ADM-style UNet (learned variance), the tiny DPT, and an ImageNet-like set."""
    monkeypatch.chdir(tmp_path)
    overrides = tiny_imagenet_overrides(imagenet_like["adm"], imagenet_like)
    overrides["trainer"] = {"max_steps": 4, "limit_val_batches": 1, "enable_progress_bar": False}
    overrides["model"]["init_args"] |= {"teacher_path": hub_dense_models["dpt"], "num_inference_steps": 2}
    del overrides["model"]["init_args"]["evaluator_path"]  # the config's own: none for depth maps of ImageNet
    run("fit", ["ppap_depth.yaml", "hub/ppap_depth_imagenet256.yaml"], overrides, tmp_path)
    experts = MultiExpertModel.from_pretrained(str(tmp_path / "runs/ppap-depth-imagenet256/version_0/experts"))
    assert experts.num_experts == 5 and type(experts.frozen_backbone().model).__name__ == "DPTForDepthEstimation"
