"""Calibration: ECE, the CalibrationCurve callback and job, CalibratedGuidance, CFG + classifier and latent guidance."""

from __future__ import annotations

import csv
import glob
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DModel
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from plugguide.callbacks.calibration_curve import CalibrationCurve
from plugguide.metrics.calibration import (
    calibration_curve,
    expected_calibration_error,
    reverse_process_calibration_curve,
)
from plugguide.models.classifier import TimmClassifier
from plugguide.pipelines.guidance.base import GuidanceStep
from plugguide.pipelines.guidance.calibrated import CalibratedGuidance, replace_relu_with_softplus
from plugguide.pipelines.guidance.calibrated_edm import CalibratedEDMGuidance
from plugguide.pipelines.guidance.classifier import ClassifierGuidance
from plugguide.pipelines.guidance.naive_classifier import NaiveClassifierGuidance
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline, SamplingRun, step_variance
from plugguide.pipelines.model_family import ModelFamily
from plugguide.pipelines.seeded_sampling import sample_batch, sample_trajectory
from tests.conftest import (
    TINY_AUTOENCODER,
    TINY_DEIT,
    TINY_RESNET,
    TINY_UNET,
    learned_variance_model,
    tiny_conditional_unet,
    tiny_scheduler,
    tiny_unet,
)

OFF = dict(softplus_beta=None, marginal_discount=1.0, sine_gamma=0.0)


def toy_predictions(num: int, overconfident: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose top class has confidence c ~ U[0.2, 1); labels equal the top class with probability c (or 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    confidence = 0.2 + 0.8 * torch.rand(num, generator=generator)
    top = torch.randint(0, 10, (num,), generator=generator)
    probabilities = ((1 - confidence) / 9)[:, None].repeat(1, 10)
    probabilities[torch.arange(num), top] = confidence
    if overconfident:
        probabilities = F.one_hot(top, 10).float() * 0.99 + 0.001
    correct_rate = 0.5 if overconfident else confidence
    correct = torch.rand(num, generator=generator) < correct_rate
    other = (top + torch.randint(1, 10, (num,), generator=generator)) % 10
    return probabilities.log(), torch.where(correct, top, other)


def test_ece_of_a_calibrated_toy_is_near_zero_and_of_an_overconfident_one_large():
    assert expected_calibration_error(*toy_predictions(20_000, overconfident=False)) < 0.02
    assert expected_calibration_error(*toy_predictions(20_000, overconfident=True)) == pytest.approx(0.49, abs=0.02)


def test_softplus_swap_replaces_every_relu_and_keeps_outputs_close_for_large_beta():
    torch.manual_seed(0)
    classifier = TimmClassifier(**TINY_RESNET).eval()
    relus = sum(isinstance(m, nn.ReLU) for m in classifier.modules())
    images = torch.randn(4, 1, 16, 16)
    before = classifier(images)
    smooth = TimmClassifier(**TINY_RESNET).eval()
    smooth.load_state_dict(classifier.state_dict())
    assert replace_relu_with_softplus(smooth, beta=200.0) == relus > 0
    assert not any(isinstance(m, nn.ReLU) for m in smooth.modules())
    assert sum(isinstance(m, nn.Softplus) and m.beta == 200.0 for m in smooth.modules()) == relus
    after = smooth(images)
    assert torch.allclose(after, before, atol=0.05 * before.abs().max().item()) and not torch.equal(after, before)
    replace_relu_with_softplus(classifier, beta=1.0)
    assert (classifier(images) - before).abs().max() > (after - before).abs().max()  # small beta: a real change


def test_softplus_swap_warns_when_the_model_has_no_relu():
    deit = TimmClassifier(**TINY_DEIT)
    with pytest.warns(UserWarning, match="no ReLU-type module"):
        assert replace_relu_with_softplus(deit, beta=3.0) == 0
    with pytest.raises(ValueError, match="softplus_beta"):
        replace_relu_with_softplus(deit, beta=0.0)


def test_calibrated_guidance_copies_the_classifier_and_defaults_to_the_paper(tiny_classifier):
    guidance = CalibratedGuidance(tiny_classifier)
    assert guidance.input == "x0_hat" and guidance.softplus_beta == 3.0 and guidance.sine_gamma == 0.3
    assert guidance.joint_temperature == 1.0 and guidance.marginal_temperature == 0.5
    assert any(isinstance(m, nn.Softplus) for m in guidance.modules())
    assert any(isinstance(m, nn.ReLU) for m in tiny_classifier.modules())  # the caller's model is untouched
    with pytest.raises(ValueError, match="marginal_discount"):
        CalibratedGuidance(tiny_classifier, marginal_discount=-0.5)


def test_equal_temperatures_reduce_to_log_softmax_and_the_discount_follows_the_formula(tiny_classifier):
    images, targets = torch.randn(6, 1, 16, 16), torch.arange(6)
    timesteps = torch.zeros(6, dtype=torch.long)
    logits = tiny_classifier.eval()(images)
    plain = CalibratedGuidance(tiny_classifier, **OFF).log_likelihood(images, timesteps, targets)
    assert torch.allclose(plain, F.log_softmax(logits, -1)[torch.arange(6), targets], atol=1e-5)
    hot = CalibratedGuidance(tiny_classifier, **{**OFF, "joint_temperature": 2.0}).log_likelihood(
        images, timesteps, targets
    )
    assert torch.allclose(hot, F.log_softmax(2 * logits, -1)[torch.arange(6), targets], atol=1e-5)
    discounted = CalibratedGuidance(tiny_classifier, **{**OFF, "marginal_discount": 0.5}).log_likelihood(
        images, timesteps, targets
    )
    expected = logits[torch.arange(6), targets] - torch.logsumexp(0.5 * logits, -1)
    assert torch.allclose(discounted, expected, atol=1e-5)


def step(
    t: int, variance: float = 0.01, index: int = 1, num_steps: int = 10, max_variance: float | None = None
) -> GuidanceStep:
    return GuidanceStep(
        timestep=t,
        index=index,
        num_steps=num_steps,
        alpha=0.5,
        sigma=0.75**0.5,
        variance=variance,
        num_train_timesteps=1000,
        max_variance=variance if max_variance is None else max_variance,
    )


def test_sine_schedule_is_the_authors_on_the_respaced_step(tiny_classifier):
    """AlexMaOLS/EluCD DDPM `p_sample`: add_value = max(sin(pi t / n) max_var 0.3, 0), t the respaced step (n - 1 .. 0),
    max_var the largest variance of the run so far, which the pipeline keeps (the guidance holds no state)."""
    guidance = CalibratedGuidance(tiny_classifier, **{**OFF, "sine_gamma": 0.3})
    steps = [(980, 0.5), (750, 0.02), (500, 0.01), (250, 0.004), (0, 0.0)]
    max_variance = 0.0
    for index, (t, variance) in enumerate(steps):
        max_variance = max(max_variance, variance)
        expected = max(math.sin(math.pi * (len(steps) - 1 - index) / len(steps)) * max_variance * 0.3, 0)
        assert guidance.variance_offset(step(t, variance, index, len(steps), max_variance)) == pytest.approx(expected)
        assert (
            guidance.step_scale(2.0, step(t, variance, index, num_steps=len(steps))) == 2.0
        )  # the offset is additive
    # At n = 300 the respaced sine is not sin(pi t / T).
    assert guidance.variance_offset(step(999, 0.01, index=0, num_steps=300)) == pytest.approx(
        math.sin(math.pi * 299 / 300) * 0.01 * 0.3
    )
    assert guidance.variance_offset(step(500, 0.01, index=1, num_steps=300)) == pytest.approx(
        math.sin(math.pi * 298 / 300) * 0.01 * 0.3
    )
    continuous = CalibratedGuidance(tiny_classifier, **{**OFF, "sine_gamma": 0.3, "schedule": "edm_continuous"})
    for t in (999, 500, 100, 0):
        assert continuous.step_scale(1.0, step(t)) == pytest.approx(
            max(t / 1000, 1e-5) + 0.3 * math.sin(math.pi * t / 1000)
        )
        assert continuous.variance_offset(step(t)) == 0.0
    assert CalibratedGuidance(tiny_classifier, **OFF).variance_offset(step(500, index=4)) == 0.0


def test_the_pipeline_carries_the_runs_largest_variance_and_no_run_leaks_into_the_next(tiny_classifier):
    """The sine term reads the largest Sigma_t of the run so far, kept by the pipeline's run record: two runs of the
    same seed give the same samples, and the offset at each step is the authors' with the run's running maximum."""
    unet, scheduler = tiny_unet(), tiny_scheduler()
    guidance = CalibratedGuidance(tiny_classifier, **{**OFF, "sine_gamma": 0.3})
    seen = []
    original = guidance.variance_offset
    guidance.variance_offset = lambda level: (
        seen.append((level.index, level.variance, level.max_variance)),
        original(level),
    )[1]
    pipeline = GuidedDiffusionPipeline(unet, scheduler, guidance)
    pipeline.set_progress_bar_config(disable=True)
    run = lambda: (
        pipeline(
            [1, 7],
            num_inference_steps=5,
            classifier_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
    )
    first, second = run(), run()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    records = seen[: len(seen) // 2]
    assert [index for index, _, _ in records] == list(range(5)) and seen[len(seen) // 2 :] == records
    assert [m for _, _, m in records] == [max(v for _, v, _ in records[: i + 1]) for i in range(5)]


def test_sine_term_is_one_uniform_value_added_to_a_learned_per_pixel_variance(tiny_classifier):
    """With a learned variance the authors shift the mean by s (Sigma_t + add_value) grad: the sine term is the same
    for every pixel, not proportional to each pixel's Sigma_t."""
    unet, scheduler = learned_variance_model()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.5)  # a variance that differs visibly between pixels
    scheduler.set_timesteps(10)
    family, index = ModelFamily(scheduler), 5
    t = scheduler.timesteps[index]
    x, targets = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 7])
    step_with = lambda guidance, scale: GuidedDiffusionPipeline(unet, scheduler, guidance).denoising_step(
        SamplingRun(family, targets, targets, scale, 0.0, torch.Generator().manual_seed(1)), x, index, t
    )
    unguided = step_with(None, 0.0)
    plain = step_with(CalibratedGuidance(tiny_classifier, **OFF), 5.0)
    sine = step_with(CalibratedGuidance(tiny_classifier, **{**OFF, "sine_gamma": 0.3}), 5.0)
    with torch.no_grad():
        variance = step_variance(scheduler, int(t), unet(x, t).sample[:, 1:])
    assert float(variance.std()) > 0.05 * float(variance.mean())  # the UNet's variance differs between pixels
    grad = (plain - unguided) / (5.0 * variance)  # s Sigma_t grad, per pixel
    offset = (
        math.sin(math.pi * 4 / 10) * float(variance.mean()) * 0.3
    )  # index 5 of 10: respaced 4; max_var: the first seen
    torch.testing.assert_close(sine - plain, 5.0 * offset * grad, rtol=1e-3, atol=1e-6)


def test_edm_schedule_is_the_authors_on_their_step_grid(tiny_classifier):
    """AlexMaOLS/EluCD EDM/generate.py, `edm_sampler`: current_guidance at step i of num_steps, len(t_steps) = num_steps + 1."""

    def authors(i: int, num_steps: int, max_guidance: float, add_factor: float) -> float:
        t_steps = num_steps + 1
        current_guidance = max((max_guidance / t_steps) * (t_steps - i), 0.00001)
        return current_guidance + math.sin(i / (t_steps - 1) * math.pi) * max_guidance * add_factor

    edm = CalibratedEDMGuidance(tiny_classifier, sine_gamma=0.3)
    for num_steps in (10, 18, 36):
        for i in range(num_steps):
            assert edm.step_scale(0.004, step(500, index=i, num_steps=num_steps)) == pytest.approx(
                authors(i, num_steps, 0.004, 0.3)
            )
    last = edm.step_scale(1.0, step(0, index=17, num_steps=18))
    assert (
        last == pytest.approx(2 / 19 + 0.3 * math.sin(17 / 18 * math.pi)) and 0.15 < last < 0.17
    )  # not 0, as the continuous form ends


def test_edm_gradient_is_the_authors_normalised_gradient(tiny_classifier):
    """Algorithm 2: classifier input x / rms(x) where rms(x) > 1, else x; gradient rescaled to rms(x) (per sample)."""
    torch.manual_seed(0)
    edm = CalibratedEDMGuidance(tiny_classifier, softplus_beta=5.0, marginal_discount=0.0)
    assert edm.input == "x_t" and edm.shifts == "sample"
    x = torch.randn(2, 1, 16, 16) * torch.tensor([5.0, 0.5]).view(2, 1, 1, 1)  # one sample above unit RMS, one below
    targets = torch.tensor([3, 7])
    grad = edm.gradient(x, torch.tensor([900, 100]), x, targets)
    # The authors' code, line by line, on the same tensors.
    x_cur_norm = (x**2).mean((1, 2, 3)) ** 0.5
    x0 = torch.stack([x[i] / x_cur_norm[i] if x_cur_norm[i] > 1 else x[i] for i in range(2)]).requires_grad_(True)
    logits = edm.classifier.eval()(x0)
    numerator = torch.exp(logits * 1.0)[torch.nn.functional.one_hot(targets, 10) != 0].unsqueeze(1)
    denominator = torch.exp(logits * 0.0).sum(1, keepdims=True)
    grads = torch.autograd.grad(torch.log(numerator / denominator).sum(), x0)[0]
    grads_norm = ((grads**2).mean((1, 2, 3))) ** 0.5
    expected = torch.stack([grads[i] / grads_norm[i] * x_cur_norm[i] for i in range(2)])
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="input"):  # Algorithm 2 reads the sample itself: no other input to choose
        CalibratedEDMGuidance(tiny_classifier, input="x0_hat")


def test_edm_algorithm_samples_as_the_authors_edm_sampler(tiny_classifier):
    """EluCD `EDM/generate.py` `edm_sampler` (S_churn = 0), transcribed, on diffusers' Heun/Karras grid with the same
    tiny UNet as EDM's denoiser D(x; s) = x - s eps(x / sqrt(1 + s^2)): Algorithm 2 guides before each step's first
    evaluation only, and the pipeline's run is theirs."""
    from diffusers import HeunDiscreteScheduler

    unet = tiny_unet()
    scheduler = HeunDiscreteScheduler.from_config(tiny_scheduler().config, use_karras_sigmas=True)
    guidance = CalibratedEDMGuidance(tiny_classifier, softplus_beta=5.0, marginal_discount=0.0)
    pipeline = GuidedDiffusionPipeline(unet, scheduler, guidance)
    pipeline.set_progress_bar_config(disable=True)
    labels, max_guidance, num_steps = torch.tensor([2, 7]), 0.05, 4
    images = pipeline(
        labels,
        num_inference_steps=num_steps,
        classifier_scale=max_guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images

    scheduler.set_timesteps(num_steps)
    t_steps = torch.cat([scheduler.sigmas[0:1], scheduler.sigmas[1::2]])  # s_0 .. s_{N-1}, 0
    model_timesteps = scheduler.timesteps[0::2]  # the UNet's timestep at each s_i

    def net(x, i):
        s = t_steps[i]
        with torch.no_grad():
            return x - s * unet(x / (1 + s**2) ** 0.5, model_timesteps[i].expand(len(x))).sample

    x_next = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        with torch.enable_grad():
            x_cur_norm = ((x_cur**2).mean((1, 2, 3))) ** 0.5
            x0 = torch.stack(
                [x_cur[k] / x_cur_norm[k] if x_cur_norm[k] > 1 else x_cur[k] for k in range(2)]
            ).requires_grad_(True)
            logits = guidance.classifier.eval()(x0)
            selected = torch.log(
                torch.exp(logits)[torch.nn.functional.one_hot(labels, 10) != 0].unsqueeze(1)
                / torch.exp(logits * 0.0).sum(1, keepdims=True)
            )
            current_guidance = max((max_guidance / len(t_steps)) * (len(t_steps) - i), 0.00001)
            current_guidance = current_guidance + math.sin(i / (len(t_steps) - 1) * math.pi) * max_guidance * 0.3
            grads = torch.autograd.grad(selected.sum(), x0)[0]
            grads_norm = ((grads**2).mean((1, 2, 3))) ** 0.5
            grads = torch.stack([grads[k] / grads_norm[k] * x_cur_norm[k] * current_guidance for k in range(2)])
        x_hat = x_cur + grads
        d_cur = (x_hat - net(x_hat, i)) / t_cur
        x_next = x_hat + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, i + 1)) / t_next
            x_next = x_hat + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    torch.testing.assert_close(images, (x_next / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)


class TimestepRoutedGuidance(ClassifierGuidance):
    """A stand-in for PPAP experts: logits depend on t, input x_t."""

    def logits(self, inputs, timesteps):
        return self.classifier(inputs) * (1 + timesteps[:, None].float() / 1000)


def test_calibrated_guidance_wraps_an_expert_style_guidance(tiny_classifier):
    experts = TimestepRoutedGuidance(tiny_classifier)
    calibrated = CalibratedGuidance(experts, sine_gamma=0.0)
    assert calibrated.input == "x_t" and calibrated.num_classes == 10
    images, timesteps = torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999])
    reference = TimestepRoutedGuidance(CalibratedGuidance(tiny_classifier).classifier)  # same Softplus copy, unwrapped
    assert torch.allclose(calibrated.logits(images, timesteps), reference.logits(images, timesteps), atol=1e-5)
    assert any(isinstance(m, nn.ReLU) for m in experts.modules())


def test_all_off_calibrated_guidance_samples_exactly_like_plain_classifier_guidance(tiny_classifier):
    def run(guidance):
        pipeline = GuidedDiffusionPipeline(tiny_unet(), tiny_scheduler(), guidance)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(
            [1, 7],
            num_inference_steps=3,
            classifier_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    plain = run(NaiveClassifierGuidance(tiny_classifier))
    assert torch.equal(run(CalibratedGuidance(tiny_classifier, input="x_t", **OFF)), plain)
    assert not torch.equal(run(CalibratedGuidance(tiny_classifier)), plain)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler])
def test_score_shift_samplers_take_no_sine_term_as_the_authors_ddim(tiny_classifier, scheduler_class):
    def run(scheduler, sine_gamma):
        pipeline = GuidedDiffusionPipeline(
            tiny_unet(), scheduler, CalibratedGuidance(tiny_classifier, **{**OFF, "sine_gamma": sine_gamma})
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(
            [1, 7],
            num_inference_steps=4,
            classifier_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    score_shift = scheduler_class.from_config(tiny_scheduler().config)
    assert torch.equal(run(score_shift, 0.3), run(score_shift, 0.0))
    assert not torch.equal(run(tiny_scheduler(), 0.3), run(tiny_scheduler(), 0.0))  # the ancestral mean shift keeps it


def test_cfg_plus_normalized_classifier_guidance(tiny_classifier):
    pipeline = GuidedDiffusionPipeline(
        tiny_conditional_unet(),
        DDIMScheduler.from_config(tiny_scheduler().config),
        CalibratedGuidance(tiny_classifier),
        cfg_guidance="normalized",
    )
    pipeline.set_progress_bar_config(disable=True)

    def run(scale):
        return pipeline(
            [3, 4],
            num_inference_steps=3,
            classifier_scale=scale,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    cfg_only, guided = run(0.0), run(1.0)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, cfg_only)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipeline(
            [3], num_inference_steps=2, classifier_scale=1.0, guidance_scale=1.0
        )  # normalized needs CFG on (g > 1)
    with pytest.raises(ValueError, match="cfg_guidance"):
        GuidedDiffusionPipeline(tiny_conditional_unet(), tiny_scheduler(), None, cfg_guidance="sum")


def test_latent_guidance_decodes_x0_hat_and_backpropagates_through_the_vae(tiny_classifier):
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_AUTOENCODER | dict(block_out_channels=(8, 8)))
    unet = UNet2DModel(**{**TINY_UNET, "sample_size": 8, "in_channels": 2, "out_channels": 2})
    pipeline = GuidedDiffusionPipeline(
        unet, DDIMScheduler.from_config(tiny_scheduler().config), CalibratedGuidance(tiny_classifier), vae=vae
    )
    pipeline.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 2, 8, 8)
    grad = pipeline.guidance_gradient(latents, torch.tensor(500), latents, torch.tensor([1, 2]))
    assert grad.shape == latents.shape and grad.abs().sum() > 0  # a latent-space gradient, through the decoder
    run = lambda scale: (
        pipeline(
            [1, 2],
            num_inference_steps=2,
            classifier_scale=scale,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
    )
    unguided, guided = run(0.0), run(50.0)
    assert unguided.shape == (2, 1, 16, 16) and not torch.allclose(guided, unguided)


class ToyValData(L.LightningDataModule):
    def val_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(16, 1, 16, 16, generator=generator) * 2 - 1
        return DataLoader(
            [{"image": images[:8], "label": torch.arange(8)}, {"image": images[8:], "label": torch.arange(8) + 2}],
            batch_size=None,
        )


class ToyDistillation(L.LightningModule):
    """Exposes `guidance`, `unet` and `scheduler` as ExpertDistillation does."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.unet = tiny_unet().eval().requires_grad_(False)
        self.scheduler = tiny_scheduler()

    @property
    def guidance(self):
        return CalibratedGuidance(self.classifier)

    def validation_step(self, batch, batch_idx):
        pass


def test_calibration_curve_callback_writes_a_figure_and_a_scalar(tmp_path, tiny_classifier):
    callback = CalibrationCurve(num_timesteps=3, max_images=12)
    trainer = L.Trainer(
        logger=TensorBoardLogger(tmp_path, name="cal"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.validate(ToyDistillation(tiny_classifier), datamodule=ToyValData())
    curve = callback.last_curves["CalibratedGuidance"]
    assert curve["timestep"] == [0, 500, 999] and all(0 <= e <= 1 for e in curve["ece"])
    events = EventAccumulator(glob.glob(str(tmp_path / "cal" / "*"))[0])
    events.Reload()
    assert "calibration/ece_vs_t" in events.Tags()["images"]
    assert "calibration/CalibratedGuidance/integral_ece" in events.Tags()["scalars"]
    assert events.Scalars("calibration/CalibratedGuidance/integral_ece")[0].value == pytest.approx(
        curve["integral_ece"][0]
    )


def test_calibration_curve_is_deterministic_and_needs_a_unet_for_x0_hat(tiny_classifier):
    batches = ToyValData().val_dataloader()
    abar = tiny_scheduler().alphas_cumprod
    naive = NaiveClassifierGuidance(tiny_classifier)
    first, second = (calibration_curve(naive, batches, [0, 999], abar, seed=3) for _ in range(2))
    assert first == second
    with pytest.raises(ValueError, match="x0_hat"):
        calibration_curve(CalibratedGuidance(tiny_classifier), batches, [0, 999], abar)


def test_reverse_process_curve_scores_the_given_samples_like_the_forward_curve_scores_its_own(tiny_classifier):
    """On the very x_t the forward curve draws, the reverse-process curve (EluCD's definition) gives the same numbers."""
    batch = next(iter(ToyValData().val_dataloader()))
    abar, timesteps = tiny_scheduler().alphas_cumprod, [0, 400, 999]
    unet = tiny_unet().eval()
    generator = torch.Generator().manual_seed(3)
    trajectory = {
        t: abar[t].sqrt() * batch["image"]
        + (1 - abar[t]).sqrt() * torch.randn(batch["image"].shape, generator=generator)
        for t in timesteps
    }
    for guidance in (NaiveClassifierGuidance(tiny_classifier), CalibratedGuidance(tiny_classifier)):
        forward = calibration_curve(guidance, [batch], timesteps, abar, unet, seed=3)
        assert reverse_process_calibration_curve(guidance, trajectory, batch["label"], abar, unet) == forward


def test_trajectory_holds_the_state_the_denoiser_reads_at_each_timestep_of_the_protocol_run():
    """`sample_trajectory` keeps, under each train timestep, the x_t the UNet is evaluated on there, from the same run
    `sample_batch` makes of those seeds; the reverse-process ECE curve then reads it."""
    unet = tiny_conditional_unet().eval()
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append((int(args[1][0]), args[0].clone())))
    pipeline = GuidedDiffusionPipeline(unet, tiny_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    batch = {"label": torch.tensor([0, 3, 7]), "seed": torch.tensor([0, 1, 2])}
    sample_batch(pipeline, batch, num_inference_steps=4)
    protocol_run, seen[:] = list(seen), []
    trajectory = sample_trajectory(pipeline, batch, num_inference_steps=4)
    assert list(trajectory) == [750, 500, 250, 0]
    assert len(seen) == len(protocol_run) == 4 and all(
        torch.equal(a, b) and t == u for (t, a), (u, b) in zip(seen, protocol_run)
    )
    assert all(torch.equal(trajectory[t], x_t) for t, x_t in seen)
    assert torch.equal(trajectory[750][1], torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))[0])
    curve = reverse_process_calibration_curve(
        CalibratedGuidance(TimmClassifier(**TINY_RESNET)),
        trajectory,
        batch["label"],
        tiny_scheduler().alphas_cumprod,
        tiny_unet(),
    )
    assert curve["timestep"] == [0, 250, 500, 750] and len(curve["ece"]) == 4
    euler = GuidedDiffusionPipeline(unet, EulerDiscreteScheduler.from_config(tiny_scheduler().config))
    with pytest.raises(ValueError, match="EulerDiscreteScheduler.*DDPMScheduler, DDIMScheduler"):
        sample_trajectory(euler, batch, num_inference_steps=4)


def test_calibration_job_writes_csv(tmp_path, tiny_assets):
    from plugguide.modules.calibration_evaluation import CalibrationEvaluation

    guides = [
        NaiveClassifierGuidance(tiny_assets["classifier-resnet"]),
        CalibratedGuidance(tiny_assets["classifier-resnet"]),
    ]
    module = CalibrationEvaluation(
        guides,
        names=["naive", "calibrated"],
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_timesteps=2,
        csv_path=str(tmp_path / "curves.csv"),
    )
    trainer = L.Trainer(
        logger=TensorBoardLogger(tmp_path, name="job"),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    metrics = trainer.validate(module, datamodule=ToyValData())[0]
    assert set(metrics) == {"calibration/naive/integral_ece", "calibration/calibrated/integral_ece"}
    with open(tmp_path / "curves.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(r["guide"], r["timestep"]) for r in rows] == [
        ("naive", "0"),
        ("naive", "999"),
        ("calibrated", "0"),
        ("calibrated", "999"),
    ]
    with pytest.raises(ValueError, match="names"):
        CalibrationEvaluation(guides, names=["one"], diffusion_model=tiny_assets["ddpm-uncond"])


def test_calibration_curve_takes_the_experts_of_expert_distillation(tmp_path, tiny_assets):
    from plugguide.modules.expert_distillation import ExpertDistillation

    torch.manual_seed(0)
    module = ExpertDistillation(
        teacher_path=tiny_assets["classifier-resnet"],
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_experts=2,
        lora_rank=4,
        evaluator_path=None,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    callback = CalibrationCurve(num_timesteps=2, max_images=8)
    trainer = L.Trainer(
        logger=TensorBoardLogger(tmp_path, name="ppap"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.validate(module, datamodule=ToyValData())
    assert set(callback.last_curves) == {"ExpertGuidance"} and len(callback.last_curves["ExpertGuidance"]["ece"]) == 2
    assert any(p.requires_grad for p in module.experts.parameters())  # measuring leaves the experts trainable
