"""metrics/: the numbers every table and job reports, checked against independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.inception import InceptionScore

from plugguide.metrics import GenerationMetrics, frechet_distance, inception_score
from plugguide.metrics.generation import unique_rows
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


def test_generation_metrics_score_accuracy_and_keep_the_real_set_across_resets():
    torch.manual_seed(0)
    metrics = GenerationMetrics(TimmClassifier(**TINY_RESNET), num_classes=10)
    real = torch.randn(40, 1, 16, 16)
    metrics.update_real(real)
    predicted = metrics.evaluator(real).argmax(-1)
    metrics.update_generated(real[:20], predicted[:20])
    metrics.update_generated(real[20:], (predicted[20:] + 1) % 10)
    results = metrics.compute()
    assert results["guided_accuracy"] == pytest.approx(0.5)
    assert results["fid"] == pytest.approx(0.0, abs=1e-4)  # the generated set is the real set
    assert 1.0 <= results["inception_score"] <= 10.0 and 0.1 <= results["evaluator_confidence"] <= 1.0
    metrics.reset()
    metrics.update_generated(real[:20])  # unlabelled samples: no accuracy, FID against the same real set
    results = metrics.compute()
    assert "guided_accuracy" not in results and results["fid"] > 0


def test_a_sample_counted_twice_counts_once_and_the_order_of_arrival_does_not_matter():
    """Lightning's DistributedSampler pads a process's last batch with repeated samples, and processes' records arrive
    rank after rank: with the global index of every sample, the numbers are those of one process (issue 12, case 8)."""
    torch.manual_seed(0)
    metrics = GenerationMetrics(TimmClassifier(**TINY_RESNET), num_classes=10)
    real, generated, targets = torch.randn(9, 1, 16, 16), torch.randn(9, 1, 16, 16), torch.arange(9)
    metrics.update_real(real, torch.arange(9))
    metrics.update_generated(generated, targets, torch.arange(9))
    expected = metrics.compute()
    metrics.reset()
    metrics.reset_real()
    # Two "ranks" of a padded sampler: even indices + index 0 again, odd indices; arriving rank after rank.
    for part in ([0, 2, 4, 6, 8, 0], [1, 3, 5, 7]):
        metrics.update_real(real[part], torch.tensor(part))
        metrics.update_generated(generated[part], targets[part], torch.tensor(part))
    assert metrics.compute() == pytest.approx(expected, rel=1e-6)
    assert len(unique_rows(metrics.generated.compute())["index"]) == 9
