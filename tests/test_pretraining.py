"""Pretraining jobs: losses fall on tiny models, exports load back, bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from plugguide.models import TimmClassifier, load_classifier
from plugguide.models.diffusion_model import load_scheduler, load_unet
from plugguide.modules import ClassifierPretraining, DiffusionPretraining
from plugguide.modules.classifier_pretraining import random_translate
from tests.conftest import TINY_RESNET, tiny_conditional_unet, tiny_scheduler, tiny_unet


def fit_steps(module, batch, steps, lr):
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.log = lambda *args, **kwargs: None
    losses = []
    for step in range(steps):
        torch.manual_seed(step % 2)  # the same two draws of noise and t: the loss on them must fall
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "class-conditional"])
def test_diffusion_loss_falls_and_export_loads_back(tmp_path, conditional):
    torch.manual_seed(0)
    unet = tiny_conditional_unet() if conditional else tiny_unet()
    module = DiffusionPretraining(unet, tiny_scheduler(), num_classes=10 if conditional else None)
    batch = {"image": torch.rand(16, 1, 16, 16).round() * 2 - 1, "label": torch.arange(16) % 10}
    losses = fit_steps(module, batch, 40, 3e-3)
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8
    module.export(str(tmp_path / "model"))
    loaded = load_unet(str(tmp_path / "model"))
    assert (
        type(loaded) is type(unet)
        and load_scheduler(str(tmp_path / "model"), "DDIMScheduler").config.beta_schedule == "squaredcos_cap_v2"
    )
    torch.testing.assert_close(loaded.state_dict(), unet.state_dict())


def test_conditional_model_needs_a_null_class():
    with pytest.raises(ValueError, match="num_class_embeds"):
        DiffusionPretraining(tiny_conditional_unet(), tiny_scheduler(), num_classes=11)
    with pytest.raises(ValueError, match="`num_classes`"):
        DiffusionPretraining(tiny_unet(), tiny_scheduler(), num_classes=10)


def test_classifier_loss_falls_and_export_loads_back(tmp_path, tiny_classifier):
    torch.manual_seed(0)
    module = ClassifierPretraining(tiny_classifier, noise_std=0.1, max_shift=1)
    batch = {"image": torch.randn(20, 1, 16, 16), "label": torch.arange(20) % 10}
    losses = fit_steps(module, batch, 30, 1e-2)
    assert losses[-1] < 0.5 * losses[0]
    module.export(str(tmp_path / "classifier"))
    loaded = load_classifier(str(tmp_path / "classifier")).eval()
    tiny_classifier.eval()
    torch.testing.assert_close(loaded(batch["image"]), tiny_classifier(batch["image"]))


def test_translation_moves_pixels_by_whole_steps():
    image = -torch.ones(1, 1, 8, 8)
    image[0, 0, 3, 3] = 1
    shifted = random_translate(image.repeat(50, 1, 1, 1), 2)
    positions = {tuple((s[0] == 1).nonzero()[0].tolist()) for s in shifted}
    assert len(positions) > 5 and all(abs(r - 3) <= 2 and abs(c - 3) <= 2 for r, c in positions)


@pytest.mark.parametrize(
    "bad, match", [(dict(model_name="resnet_does_not_exist"), "`model_name`"), (dict(num_classes=1), "`num_classes`")]
)
def test_classifier_rejects_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        TimmClassifier(**TINY_RESNET | bad)


def test_missing_paths_name_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="`classifier_path`"):
        load_classifier(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="`diffusion_model`"):
        load_unet(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="`scheduler`='LMSDiscreteScheduler'"):
        load_scheduler(str(tmp_path), "LMSDiscreteScheduler")
