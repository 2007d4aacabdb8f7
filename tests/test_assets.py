"""The shipped digits models load by path and reach their recorded quality; the evaluator is not fooled."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import PooledPixels
from plugguide.models.classifier import load_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets", "digits")


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataModule(batch_size=1000)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    return batch["image"], batch["label"]


@pytest.mark.parametrize("name", ["classifier-resnet", "classifier-deit", "evaluator"])
def test_classifier_reaches_97_percent_on_the_test_split(name, test_split):
    images, labels = test_split
    with torch.no_grad():
        accuracy = (
            (load_classifier(os.path.join(ASSETS, name)).eval()(images).argmax(-1) == labels).float().mean().item()
        )
    assert accuracy >= 0.97


def test_dense_models_read_the_maps_of_the_test_digits(test_split):
    """The segmenter labels strokes with their digit and the depth stand-in measures the distance to them, on held-out digits."""
    from torchmetrics.functional.segmentation import mean_iou

    from plugguide.metrics import digit_segmentation, distance_to_stroke, majority_digit
    from plugguide.metrics.dense import map_correlation
    from plugguide.models import load_dense_model

    images, labels = test_split
    with torch.no_grad():
        segmentation = load_dense_model(os.path.join(ASSETS, "segmenter")).eval()(images).argmax(1)
        depth = load_dense_model(os.path.join(ASSETS, "depth")).eval()(images)
    assert (
        mean_iou(segmentation, digit_segmentation(images, labels), num_classes=11, input_format="index").mean() >= 0.95
    )
    assert (majority_digit(segmentation) == labels).float().mean() >= 0.97
    assert (depth - distance_to_stroke(images)).abs().mean() <= 0.25 and map_correlation(
        depth, distance_to_stroke(images)
    ).mean() >= 0.98


def test_assets_stay_under_30_mb():
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(ASSETS) for f in files)
    assert size < 30 * 2**20


def test_quality_metrics_rank_a_collapse_onto_class_prototypes_below_real_held_out_digits():
    """A sample set that replaces each digit by its class prototype must score worse than real digits.

    Reference: the train split; held-out: the test split; collapsed: each test digit replaced by the train digit
    nearest its class mean (a real, sharp digit, so the evaluator still reads the class). The autoencoder and pixel
    spaces rank the collapse far below the held-out digits, and its within-class diversity falls to zero.
    """
    from plugguide.metrics import GenerationMetrics

    data = DigitsDataModule(batch_size=2000)
    data.setup("fit")
    train, test = next(iter(data.dataloader("train"))), next(iter(data.test_dataloader()))
    prototypes = {}
    for c in range(10):
        members = train["image"][train["label"] == c]
        prototypes[c] = members[(members - members.mean(0)).flatten(1).norm(dim=1).argmin()]
    collapsed = torch.stack([prototypes[int(c)] for c in test["label"]])
    metrics = GenerationMetrics.from_paths(os.path.join(ASSETS, "evaluator"), os.path.join(ASSETS, "autoencoder"))
    metrics.update_real(train["image"], train["label"])
    scores = {}
    for name, images in (("held_out", test["image"]), ("collapsed", collapsed)):
        metrics.reset()
        metrics.update_generated(images, test["label"])
        scores[name] = metrics.compute()
    held_out, collapsed = scores["held_out"], scores["collapsed"]
    assert collapsed["guided_accuracy"] > 0.95  # the class is kept: accuracy cannot see the collapse
    for space in ("autoencoder", "pixels"):
        assert collapsed[f"fid_{space}"] > 5 * held_out[f"fid_{space}"], space
        assert collapsed[f"recall_{space}"] < 0.5 * held_out[f"recall_{space}"], space
        assert collapsed[f"diversity_{space}"] < 0.01 < 0.8 < held_out[f"diversity_{space}"], space


@pytest.fixture
def table_scripts(monkeypatch) -> tuple:
    """scripts/protocol.py and scripts/measure_assets.py (scripts/ is not a package: its modules import each other)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    return importlib.import_module("protocol"), importlib.import_module("measure_assets")


def count_shared(images: torch.Tensor, others: torch.Tensor) -> int:
    """How many rows of `images` (N, ...) are also rows of `others` (M, ...), exactly."""
    distances = torch.cdist(images.flatten(1), others.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    return int((distances.min(1).values == 0).sum())


def test_the_tables_reference_is_the_test_split_no_model_trained_or_picked_a_checkpoint_on(table_scripts):
    """Every table's reference digits are the test split's: none is a train digit or a val digit."""
    protocol, _ = table_scripts
    data = DigitsDataModule()
    reference = protocol.reference_metrics(data).real.compute()["pixels"]  # each reference digit pooled to 8x8
    pooled = {split: PooledPixels(8)(data.split_images(split)[0]) for split in ("train", "val", "test")}
    assert count_shared(reference, pooled["test"]) == len(reference) == len(pooled["test"]) == 359
    assert count_shared(reference, pooled["train"]) == count_shared(reference, pooled["val"]) == 0


def test_the_floor_rows_score_real_digits_outside_the_reference(table_scripts):
    """Floors: the val digits (new real digits) and 500 train digits (copies), none a reference digit."""
    protocol, measure_assets = table_scripts
    data = DigitsDataModule()
    reference, _ = data.split_images(protocol.REFERENCE_SPLIT)
    (new, new_labels), (copies, _) = measure_assets.floor_sets(data, 500).values()
    assert len(new) == 180 and len(copies) == 500 and bool((new_labels.diff() >= 0).all())  # grouped by class
    assert count_shared(new, data.split_images("val")[0]) == 180
    assert count_shared(copies, data.split_images("train")[0]) == 500
    assert count_shared(new, reference) == count_shared(copies, reference) == 0


@pytest.mark.parametrize("teacher_name", ["classifier-resnet", "classifier-deit"])
def test_steps_that_flip_the_teacher_do_not_flip_the_evaluator(teacher_name, test_split):
    """Small classifiers have adversarial gradients: guidance can fool the guide, not the judge.

    Ten normalised gradient steps on log p_teacher(target), L2 0.25 each (about 10% of a digit's norm),
    push the teacher to the wrong target on many test digits; the evaluator still reads the true digit.
    """
    images, labels = test_split
    teacher = load_classifier(os.path.join(ASSETS, teacher_name)).eval()
    evaluator = load_classifier(os.path.join(ASSETS, "evaluator")).eval()
    targets = (labels + 1) % 10
    x = images.clone()
    for _ in range(10):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(
            torch.nn.functional.log_softmax(teacher(x), -1).gather(1, targets[:, None]).sum(), x
        )
        x = (x + 0.25 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).detach()
    with torch.no_grad():
        fooled_teacher = (teacher(x).argmax(-1) == targets).float().mean().item()
        fooled_evaluator = (evaluator(x).argmax(-1) == targets).float().mean().item()
    assert fooled_teacher > 0.4 and fooled_evaluator < 0.1
