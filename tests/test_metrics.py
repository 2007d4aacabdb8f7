"""metrics/: the numbers every table and job reports, checked against independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import GenerationMetrics, PooledPixels, frechet_distance, inception_score, kernel_distance
from plugguide.metrics.generation import diversity_ratio, unique_rows, wilson_interval
from plugguide.metrics.reporting import best_scale, estimate
from plugguide.models import TimmClassifier
from tests.conftest import TINY_CONVNEXT, TINY_DEIT, TINY_RESNET


def scipy_frechet(real: np.ndarray, generated: np.ndarray) -> float:
    mu_r, mu_g = real.mean(0), generated.mean(0)
    cov_r, cov_g = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    root = scipy.linalg.sqrtm(cov_r @ cov_g).real
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(cov_r + cov_g - 2 * root))


def test_frechet_distance_matches_scipy_and_is_zero_for_identical_sets():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=generator)
    generated = 0.7 * torch.randn(300, 8, generator=generator) + 0.3
    assert frechet_distance(real, generated) == pytest.approx(scipy_frechet(real.numpy(), generated.numpy()), rel=1e-6)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)


def test_inception_score_matches_torchmetrics():
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(1)) * 3
    reference = InceptionScore(feature=nn.Identity(), splits=1)
    reference.update(logits)  # torchmetrics softmaxes the "features" it is given as logits
    assert inception_score(logits.softmax(-1)) == pytest.approx(float(reference.compute()[0]), rel=1e-5)


@pytest.mark.parametrize("spec", [TINY_RESNET, TINY_DEIT, TINY_CONVNEXT], ids=["resnet", "deit", "convnext"])
def test_one_pass_gives_the_classifiers_own_logits(spec):
    torch.manual_seed(0)
    classifier = TimmClassifier(**spec).eval()
    images = torch.randn(3, 1, 16, 16)
    features, logits = classifier.features_and_logits(images)
    assert features.shape == (3, classifier.num_features)
    assert torch.allclose(logits, classifier(images), atol=1e-5)


def test_kernel_distance_matches_torchmetrics_for_equal_sizes_and_is_unbiased_for_unequal_ones():
    generator = torch.Generator().manual_seed(2)
    real, same = (
        torch.randn(300, 6, generator=generator, dtype=torch.float64),
        torch.randn(300, 6, generator=generator, dtype=torch.float64),
    )
    other = torch.randn(120, 6, generator=generator, dtype=torch.float64) + 1
    expected = maximum_mean_discrepancy(poly_kernel(real, real), poly_kernel(real, same), poly_kernel(same, same))
    assert kernel_distance(real, same) == pytest.approx(float(expected), rel=1e-6, abs=1e-9)
    assert abs(kernel_distance(real, same[:100])) < 0.2 * kernel_distance(
        real, other
    )  # ~0 for one distribution, any size


def test_wilson_interval_matches_the_textbook_value():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = wilson_interval(500, 500)
    assert high == 1.0 and 0.99 < low < 1.0  # informative where a bootstrap would collapse to [1, 1]


def test_diversity_ratio_sees_a_collapse_onto_one_prototype_per_class():
    generator = torch.Generator().manual_seed(3)
    real, classes = torch.randn(200, 4, generator=generator), torch.arange(200) % 4
    assert diversity_ratio(real, classes, real, classes) == pytest.approx(1.0)
    prototypes = torch.stack([real[classes == c].mean(0) for c in range(4)])[classes] + 0.01 * torch.randn(
        200, 4, generator=generator
    )
    assert diversity_ratio(real, classes, prototypes, classes) < 0.05


def test_generation_metrics_score_accuracy_and_keep_the_real_set_across_resets():
    torch.manual_seed(0)
    metrics = GenerationMetrics(
        TimmClassifier(**TINY_RESNET), num_classes=10, feature_spaces={"coarse": PooledPixels(4)}
    )
    real = torch.randn(40, 1, 16, 16)
    predicted = metrics.evaluator(real).argmax(-1)
    metrics.update_real(real, predicted)
    metrics.update_generated(real[:20], predicted[:20])
    metrics.update_generated(real[20:], (predicted[20:] + 1) % 10)
    results = metrics.compute()
    assert results["guided_accuracy"] == pytest.approx(0.5) and results["num_samples"] == 40
    for space in ("evaluator", "pixels", "coarse"):
        assert results[f"fid_{space}"] == pytest.approx(0.0, abs=1e-4)  # the generated set is the real set
        assert results[f"precision_{space}"] == results[f"coverage_{space}"] == 1.0
    assert 1.0 <= results["inception_score"] <= 10.0 and 0.1 <= results["evaluator_confidence"] <= 1.0
    metrics.reset()
    metrics.update_generated(real[:20])  # unlabelled samples: no accuracy, distances against the same real set
    results = metrics.compute()
    assert "guided_accuracy" not in results and results["fid_pixels"] > 0


def test_intervals_hold_the_estimate_and_narrow_with_more_samples():
    torch.manual_seed(0)
    metrics = GenerationMetrics(TimmClassifier(**TINY_RESNET), num_classes=10)
    metrics.update_real(torch.randn(400, 1, 16, 16))
    widths = []
    for count in (60, 400):
        metrics.reset()
        metrics.update_generated(0.9 * torch.randn(count, 1, 16, 16) + 0.1, torch.zeros(count, dtype=torch.long))
        results, intervals = metrics.compute(), metrics.compute_intervals(num_resamples=50)
        for key in ("guided_accuracy", "fid_pixels", "kid_pixels", "fid_evaluator"):
            assert intervals[key][0] <= results[key] <= intervals[key][1], key
        widths.append(intervals["fid_pixels"][1] - intervals["fid_pixels"][0])
    assert widths[1] < widths[0]


def test_nearest_training_ratio_is_one_for_new_digits_and_near_zero_for_copies_of_training_digits():
    """The memorisation check: against held-out reference digits, other held-out digits sit as far from the training
    digits (ratio ~1, inside its interval) and copies of training digits sit on them (ratio ~0)."""
    data = DigitsDataModule()
    (train, _), (val, val_labels), (test, test_labels) = (data.split_images(s) for s in ("train", "val", "test"))
    torch.manual_seed(0)
    metrics = GenerationMetrics(TimmClassifier(**TINY_RESNET), num_classes=10, training_images=train)
    metrics.update_real(test, test_labels)
    scores = {}
    for name, samples in (("new", val), ("copies", train[: len(val)])):
        metrics.reset()
        metrics.update_generated(samples, val_labels)
        scores[name] = metrics.compute() | {"intervals": metrics.compute_intervals(num_resamples=50)}
    new, copies = scores["new"], scores["copies"]
    low, high = new["intervals"]["nearest_training_ratio"]
    assert 0.9 < new["nearest_training_ratio"] < 1.1 and low < 1.0 < high
    assert new["nearest_training_distance"] > 1.0  # pixels in [-1, 1]: a new digit differs from every training one
    assert copies["nearest_training_ratio"] == copies["nearest_training_distance"] == 0.0
    with pytest.raises(ValueError, match="training_images"):
        metrics.update_generated(torch.zeros(2, 1, 8, 8))
    without = GenerationMetrics(metrics.evaluator, num_classes=10)
    without.update_real(test, test_labels)
    without.update_generated(val, val_labels)
    assert "nearest_training_ratio" not in without.compute() | without.compute_intervals(num_resamples=2)


def test_best_scale_takes_the_most_accurate_scale_within_unguided_quality():
    unguided = {"fid_autoencoder": 5.0, "intervals": {"fid_autoencoder": (4.0, 6.0)}}
    sweep = {
        "3": {"guided_accuracy": 0.7, "fid_autoencoder": 4.5},
        "10": {"guided_accuracy": 0.9, "fid_autoencoder": 5.9},
        "30": {"guided_accuracy": 1.0, "fid_autoencoder": 9.0},
    }
    assert best_scale(sweep, unguided) == ("10", True)  # 30 is more accurate but leaves the unguided quality
    assert best_scale({"30": sweep["30"], "100": {"guided_accuracy": 1.0, "fid_autoencoder": 20.0}}, unguided) == (
        "30",
        False,
    )
    assert estimate({"fid": 1.234, "intervals": {"fid": (1.0, 1.5)}}, "fid") == "1.23 [1.00, 1.50]"


def test_a_sample_counted_twice_counts_once_and_the_order_of_arrival_does_not_matter():
    """Lightning's DistributedSampler pads a process's last batch with repeated samples, and processes' records arrive
    rank after rank: with the global index of every sample, the numbers are those of one process."""
    torch.manual_seed(0)
    metrics = GenerationMetrics(TimmClassifier(**TINY_RESNET), num_classes=10)
    real, generated, targets = torch.randn(9, 1, 16, 16), torch.randn(9, 1, 16, 16), torch.arange(9)
    metrics.update_real(real, None, torch.arange(9))
    metrics.update_generated(generated, targets, torch.arange(9))
    expected = metrics.compute()
    metrics.reset()
    metrics.real.reset()
    # Two "ranks" of a padded sampler: even indices + index 0 again, odd indices; arriving rank after rank.
    for part in ([0, 2, 4, 6, 8, 0], [1, 3, 5, 7]):
        metrics.update_real(real[part], None, torch.tensor(part))
        metrics.update_generated(generated[part], targets[part], torch.tensor(part))
    assert metrics.compute() == pytest.approx(expected, rel=1e-6, nan_ok=True)
    assert len(unique_rows(metrics.generated.compute())["index"]) == 9
