"""Classifier-type guidance for the stock diffusers pipelines users already run, by wrapping their denoiser.

    with guided(pipe, CalibratedGuidance("assets/digits/classifier-resnet"), classifier_scale=4, targets=[3] * 16):
        images = pipe(batch_size=16, num_inference_steps=25).images

The pipeline's own loop, scheduler, CFG and VAE run unchanged; only its denoiser (`pipe.unet` or `pipe.transformer`)
returns, at every evaluation, the output that predicts the guided noise of Dhariwal & Nichol (2021, "condition_score"),

    eps' = eps - s sigma_t grad log p(y | .),   o' = o + (d o / d eps) (eps' - eps)   (pipelines/model_family.py),

at the noise level of the timestep the pipeline passes, under the pipeline's scheduler, with the same gradient as
`GuidedDiffusionPipeline` (pipelines/score_shift.py: x_t or x0_hat, decoded by `pipe.vae` for latent models).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from diffusers import DiffusionPipeline, DiTPipeline, FluxTransformer2DModel
from diffusers.utils.torch_utils import unwrap_module

from plugguide.models.grid_ddim import sampler_on_grid
from plugguide.pipelines.finite import check_scale
from plugguide.pipelines.guidance.base import Guidance
from plugguide.pipelines.guidance.training_free import TFG
from plugguide.pipelines.model_family import ModelFamily, NoiseLevel
from plugguide.pipelines.score_shift import (
    check_decoder_options,
    clean_estimate,
    decode_latents,
    level_gradient,
    noise_shift,
    predicted_shift,
)
from plugguide.pipelines.training_free_update import check_training_free, signal_ratios, training_free_update

DENOISER_NAMES = ("unet", "transformer")
INPUT_NAMES = ("sample", "hidden_states")
# Denoisers whose forward multiplies the timestep it is given by 1000 (`FluxTransformer2DModel.forward`:
# `timestep * 1000`), so their pipelines pass the scheduler's timestep / 1000 (the flow sigma); subclasses count.
TIMESTEP_MULTIPLIERS = ((FluxTransformer2DModel, 1000.0),)
# Under CFG diffusers' pipelines stack (unconditional, conditional), `noise_pred_uncond, noise_pred_text = chunk(2)`;
# these stack the conditional half first (DiT: `torch.cat([class_labels, class_null])`); subclasses count.
CONDITIONAL_FIRST = (DiTPipeline,)


@contextlib.contextmanager
def guided(
    pipe: DiffusionPipeline,
    guidance: Guidance,
    classifier_scale: float,
    targets: Sequence | torch.Tensor,
    *,
    guidance_batch_size: int | None = None,
    guidance_vae=None,
    decoder_gradient_checkpointing: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> Iterator[DiffusionPipeline]:
    """Guides every denoiser call of `pipe` in the `with` block; the denoiser is restored on exit, also on error.

    Each call of the denoiser is placed in the run by the pipeline's scheduler: its step index (or, for samplers
    without one, the timestep's position in `scheduler.timesteps`) names the noise level, which
    `ModelFamily.noise_level` turns into (alpha, sigma, the train timestep PPAP experts route by); the state x is the
    denoiser's input divided by the scheduler's `scale_model_input` factor (Euler and Heun scale it, flow samplers feed
    it as it is), and a timestep that is not the scheduler's own at that index is refused. Flow's first step (s = 1,
    pure noise) is not guided, as in `GuidedDiffusionPipeline`.

    Under CFG the pipeline doubles the batch; the shift d (in eps units) is computed once per sample, from the state
    and the conditional half's x0_hat, and added to both halves. That equals shifting the combined output, since for
    any CFG weight g

        eps_u + g (eps_c - eps_u) + d = (eps_u + d) + g ((eps_c + d) - (eps_u + d)),

    and the same holds for Flux's true CFG, whose two calls at one state take the shift of the first (conditional)
    call, and for SD3's skip-layer call. `GuidedDiffusionPipeline` takes x0_hat from the combined output instead (it
    knows g); guides on x_t (PPAP experts) give both the same shift.

    The ancestral DDPM step (`DDPMScheduler`) takes the score-shift form here, eps' = eps - s sigma_t grad, which moves
    its mean by s (beta_t / sqrt(alpha_t)) grad (beta_t, alpha_t of the step), not by Dhariwal & Nichol's `s Sigma_t
    grad` (Sigma_t = beta_t (1 - abar_prev) / (1 - abar_t)) that `GuidedDiffusionPipeline` applies there: a denoiser
    wrapper returns an output and never sees the step's mean. Samplers that clip x0_hat (`clip_sample`, `thresholding`)
    step as their unclipped copy inside the block (guided-diffusion's order: clip x0_hat, then shift), each CFG half
    clipped.

    Devices and precision: the guidance and the targets go to the pipeline's execution device
    (`pipe._execution_device`, which follows `enable_model_cpu_offload` and sequential offload), the guidance as a copy
    where it is not there already, so the module handed in keeps its device and dtype. A classifier runs in its own
    dtype (its input is cast to it, its shift back to the denoiser's); a distilled guide, which reads the denoiser's
    latents, runs in the denoiser's dtype. A float16 VAE whose config sets `force_upcast` (SDXL's) decodes in float32
    inside the gradient, as diffusers' SDXL pipeline decodes. A compiled denoiser (`torch.compile`) and subclasses of
    the stock pipelines, denoisers and schedulers are guided as the stock ones.

    Args:
        pipe (`DiffusionPipeline`): a diffusers pipeline with a `unet` or `transformer` whose forward takes `sample` or
            `hidden_states` and `timestep`, and a scheduler of `SCHEDULER_FAMILIES`; latent pipelines decode with
            `pipe.vae` (Flux's packed latents with its own `_unpack_latents`).
        guidance (`Guidance`): any score-shifting `Guidance` of the project (classifier on x_t or x0_hat, calibrated,
            PPAP experts, dense guides, distilled guides, and the training-free `TFG` presets whose step is a score
            shift: DPS, LGD, and UGD without recurrence); EluCD's EDM Algorithm 2 (`CalibratedEDMGuidance`) moves the
            sample, not the output, and is refused, as are TFG's recurrence and its ascent on x0_hat with the noise
            kept (`TFG.moves_sample`): a wrapper can neither re-run a step nor move the state the scheduler steps
            from. A `TFG` method that differentiates through the denoiser runs it once per call with autograd on,
            through the conditional CFG half (the wrapper does not know the pipeline's CFG weight).
        classifier_scale (`float`): the guidance gradient scale s >= 0; 0 leaves the pipeline's outputs bitwise as they
            are.
        targets (`Sequence | torch.Tensor`): one target per image of the pipeline's batch, in the pipeline's order
            (prompt by prompt, `num_images_per_prompt` images each): a class, or a dense guide's target map.
        guidance_batch_size (`int`, *optional*): samples per decode + guide + backward pass of the guidance gradient;
            the batch goes through in chunks of this size, with the same gradient (it is per sample). None: all at once.
        guidance_vae (*optional*): a lighter decoder of the same latent space for the gradient only, e.g. diffusers'
            `AutoencoderTiny` (madebyollin/taesd for SD 1.x, taesdxl for SDXL); `pipe.vae` still decodes the images.
        decoder_gradient_checkpointing (`bool`, defaults to False): recompute the decoder's block activations in the
            guidance's backward pass instead of keeping them, switched on for the guidance pass only.
        generator (`torch.Generator | list[torch.Generator]`, *optional*): for the smoothing draws of a `TFG` method
            with `sigma` > 0 (the pipeline's own generator does not reach the denoiser); None: torch's global one.

    Yields:
        `pipe`, guided.
    """
    wrapper = guided_denoiser(
        pipe,
        guidance,
        classifier_scale,
        targets,
        guidance_batch_size=guidance_batch_size,
        guidance_vae=guidance_vae,
        decoder_gradient_checkpointing=decoder_gradient_checkpointing,
        generator=generator,
    )
    scheduler = pipe.scheduler
    pipe.scheduler = wrapper.family.scheduler  # the pipeline's own, or its unclipped or grid copy
    wrapper.install()
    try:
        yield pipe
    finally:
        wrapper.uninstall()
        pipe.scheduler = scheduler


def guided_denoiser(
    pipe,
    guidance: Guidance,
    classifier_scale: float,
    targets: Sequence | torch.Tensor,
    *,
    guidance_batch_size: int | None = None,
    guidance_vae=None,
    decoder_gradient_checkpointing: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> "GuidedDenoiser":
    """The guided forward of `pipe`'s denoiser (arguments as for `guided`), checked and built, not yet installed.

    A scheduler that clips x0_hat gets a family stepping as its unclipped copy (`clip_first`), and a halved distilled
    guide one stepping on its grid (`GridDDIMScheduler`); `guided` puts that copy in the pipeline while the forward is
    installed.
    """
    check_scale("classifier_scale", classifier_scale)
    name = next((name for name in DENOISER_NAMES if isinstance(getattr(pipe, name, None), torch.nn.Module)), None)
    if name is None:
        raise ValueError(f"`pipe` {type(pipe).__name__} has no denoiser `unet` or `transformer` to guide.")
    denoiser = getattr(pipe, name)
    # A halved distilled guide steps on the DDIM grid it was halved on (the pipeline's scheduler while installed).
    grid = guidance.timesteps if classifier_scale > 0 else None
    scheduler = sampler_on_grid(pipe.scheduler, grid, "pipe.scheduler")
    family = ModelFamily(scheduler, sets_timesteps=False)  # refuses a sampler it cannot convert
    if guidance.shifts != "score":
        raise ValueError(
            f"{type(guidance).__name__} moves the sample before the denoiser sees it (shifts={guidance.shifts!r}); a "
            f"denoiser wrapper can only shift the output."
        )
    parameters = inspect.signature(unwrap_module(denoiser).forward).parameters  # a compiled module's own forward
    input_name = next((name for name in INPUT_NAMES if name in parameters), None)
    if input_name is None or "timestep" not in parameters:
        raise ValueError(
            f"`pipe.{name}` {type(denoiser).__name__} takes ({', '.join(parameters)}); guided needs a `sample` or "
            f"`hidden_states` input and a `timestep`."
        )
    components = getattr(pipe, "components", {})
    decoders = [
        key
        for key, value in components.items()
        if key != "vae" and isinstance(value, torch.nn.Module) and hasattr(value, "decode")
    ]
    if decoders:
        raise ValueError(
            f"`pipe` {type(pipe).__name__} decodes its latents with `{decoders[0]}`; guided decodes latents with "
            f"`pipe.vae` only."
        )
    check_decoder_options(
        getattr(pipe, "vae", None),
        guidance_batch_size=guidance_batch_size,
        guidance_vae=guidance_vae,
        decoder_gradient_checkpointing=decoder_gradient_checkpointing,
    )
    targets = torch.as_tensor(targets)
    clip_first = classifier_scale > 0 and not family.ancestral and family.clips_clean_image
    if clip_first:
        family = family.without_clipping()
    device = pipe._execution_device
    if classifier_scale > 0:
        guidance.check_targets(targets)
        guidance.check_classifier_scale(classifier_scale)
        if isinstance(guidance, TFG):
            check_in_stock_pipeline(guidance)
            check_training_free(guidance, family, guidance_batch_size)
        if guidance.normalize_gradient:
            raise ValueError(
                "`normalize_gradient` rescales the ancestral DDPM step's mean shift, which `GuidedDiffusionPipeline` "
                "applies; inside a stock pipeline every step shifts the score. Leave it off here."
            )
        guidance = guidance_on(guidance, device, compute_dtype(denoiser) if guidance.predicts_shift else None)
        guidance_vae = None if guidance_vae is None else guidance_on(guidance_vae, device)
    return GuidedDenoiser(
        pipe,
        denoiser,
        input_name,
        family,
        guidance,
        classifier_scale=classifier_scale,
        targets=targets.to(device),
        clip_first=clip_first,
        guidance_batch_size=guidance_batch_size,
        guidance_vae=guidance_vae,
        decoder_gradient_checkpointing=decoder_gradient_checkpointing,
        generator=generator,
    )


def check_in_stock_pipeline(guidance: TFG) -> None:
    """Fails, naming the setting and the alternative, on the `TFG` pieces that change the step rather than the score."""
    if guidance.recurrence > 1:
        raise ValueError(
            f"`recurrence`={guidance.recurrence} re-runs each step from its re-noised result, which a stock pipeline's "
            f"loop does not do and a denoiser wrapper cannot ask of it; sample with `GuidedDiffusionPipeline`, or set "
            f"`recurrence`=1 here."
        )
    if guidance.moves_sample:
        raise ValueError(
            f"`x0_update`='keep_noise' with `mu`={guidance.mu} moves the state the scheduler steps from (x0_hat + "
            f"Delta_0 with the noise kept), and a denoiser wrapper only returns an output; sample with "
            f"`GuidedDiffusionPipeline`, or use `x0_update`='keep_sample' (UGD's form, a score shift) here."
        )


def floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of `module`'s first floating-point parameter or buffer; None for a module without one."""
    tensors = [*module.parameters(), *module.buffers()]
    return next((tensor.dtype for tensor in tensors if tensor.is_floating_point()), None)


def compute_dtype(denoiser: torch.nn.Module) -> torch.dtype | None:
    """The dtype `denoiser` computes in: a diffusers model's `dtype` (under layerwise casting the compute dtype, while
    the weights are stored in float8), else its first floating-point tensor's."""
    return getattr(denoiser, "dtype", None) or floating_dtype(denoiser)


def guidance_on(guidance: Guidance, device: torch.device, dtype: torch.dtype | None = None) -> Guidance:
    """`guidance` on `device` (and in `dtype`, where given): the module handed in where it already is, else a copy.

    Moving or casting the caller's module in place would outlast the `with` block, and restoring a cast to half
    precision would not give the weights back (float32 -> float16 -> float32 rounds).
    """
    device = torch.device(device)

    def placed(tensor: torch.Tensor) -> bool:
        on_device = tensor.device.type == device.type and device.index in (None, tensor.device.index)
        return on_device and (dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype)

    if all(placed(tensor) for tensor in [*guidance.parameters(), *guidance.buffers()]):
        return guidance
    return copy.deepcopy(guidance).to(device=device, dtype=dtype)


def split_learned_variance(prediction: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, variance): learned-variance denoisers (ADM, DiT, IF) return the variance channels after the
    prediction's `channels`; None for the rest."""
    if prediction.shape[1] == channels:
        return prediction, None
    return prediction[:, :channels], prediction[:, channels:]


class CachedShift(NamedTuple):
    """The shift of the last evaluation, for a second denoiser call at the same state."""

    index: int
    state: torch.Tensor
    shift: torch.Tensor


class GuidedDenoiser:
    """A denoiser's forward that returns the guided output (see `guided`, which installs it and takes it away).

    Args:
        pipe: the pipeline whose scheduler places each call and whose VAE decodes latents.
        denoiser (`torch.nn.Module`): the module whose forward this replaces while installed (`install`, `uninstall`);
            a `torch.compile` wrapper is read through to its module.
        input_name (`str`): its input's keyword, `sample` or `hidden_states`.
        family (`ModelFamily`): `ModelFamily` of the pipeline's scheduler (built with `sets_timesteps=False`).
        guidance (`Guidance`): the `Guidance`, on the pipeline's execution device.
        classifier_scale (`float`): s.
        targets (`torch.Tensor`): one per sample, on the pipeline's execution device.
        clip_first (`bool`): the scheduler clips x0_hat and steps as its unclipped copy: clip before the shift.
        guidance_batch_size (`int`, *optional*): samples per guidance pass (`guided`).
        guidance_vae (*optional*): the decoder of the guidance gradient in place of `pipe.vae` (`guided`).
        decoder_gradient_checkpointing (`bool`, defaults to False): checkpoint that decoder in the guidance pass.
        generator (*optional*): the generator(s) of a `TFG` method's smoothing draws (`guided`).
    """

    def __init__(
        self,
        pipe,
        denoiser: torch.nn.Module,
        input_name: str,
        family: ModelFamily,
        guidance: Guidance,
        *,
        classifier_scale: float,
        targets: torch.Tensor,
        clip_first: bool,
        guidance_batch_size: int | None = None,
        guidance_vae=None,
        decoder_gradient_checkpointing: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> None:
        self.pipe = pipe
        self.generator = generator
        self._signal_ratios: tuple[torch.Tensor, list[float]] | None = None
        self.vae = getattr(pipe, "vae", None) if guidance_vae is None else guidance_vae  # the gradient's decoder
        self.guidance_batch_size = guidance_batch_size
        self.decoder_gradient_checkpointing = decoder_gradient_checkpointing
        self.denoiser = denoiser
        self.forward = denoiser.forward
        self.replaces_own_forward = "forward" in vars(denoiser)  # an offload hook's or torch.compile's forward
        self.signature = inspect.signature(unwrap_module(denoiser).forward)
        self.input_name = input_name
        self.family = family
        self.guidance = guidance
        self.guidance_dtype = floating_dtype(guidance)
        self.classifier_scale = classifier_scale
        self.targets = targets
        self.clip_first = clip_first
        module = unwrap_module(denoiser)
        self.timestep_multiplier = next(
            (multiplier for kind, multiplier in TIMESTEP_MULTIPLIERS if isinstance(module, kind)), 1.0
        )
        self.conditional_half = 0 if isinstance(pipe, CONDITIONAL_FIRST) else 1
        self._last: CachedShift | None = None

    def install(self) -> None:
        """The denoiser's calls go through this guided forward."""
        self.denoiser.forward = self

    def uninstall(self) -> None:
        """The denoiser's own forward again."""
        if self.replaces_own_forward:
            self.denoiser.forward = self.forward
        else:
            del self.denoiser.forward

    def __call__(self, *args, **kwargs):
        if self.classifier_scale > 0 and isinstance(self.guidance, TFG):
            return self.training_free_call(*args, **kwargs)
        output = self.forward(*args, **kwargs)
        if self.classifier_scale == 0:
            return output
        arguments = self.signature.bind(*args, **kwargs).arguments
        index, timestep = self.evaluation(arguments["timestep"])
        level = self.family.noise_level(index, timestep)
        if level.alpha <= 0:  # pure noise: p(y | x_t) = p(y), the exact guidance term is zero
            return output
        prediction = output[0] if isinstance(output, tuple) else output.sample
        guided = self.guided_output(arguments[self.input_name], prediction, index, timestep, level, arguments)
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output

    def training_free_call(self, *args, **kwargs):
        """A call under `TFG` (`pipelines/training_free_update.py`): where the method differentiates through the
        denoiser, the denoiser runs once with autograd on, from the VP sample x_t of the conditional half (both CFG
        halves hold the same state), so x0_hat(x_t) of the conditional branch carries its graph; every half takes the
        eps shift. A second call at the same state reuses the shift, as `shift` does."""
        bound = self.signature.bind(*args, **kwargs)
        index, timestep = self.evaluation(bound.arguments["timestep"])
        level = self.family.noise_level(index, timestep)
        model_input = bound.arguments[self.input_name]
        if level.alpha <= 0:  # pure noise: not guided
            return self.forward(*args, **kwargs)
        branches = self.cfg_branches(model_input.shape[0])
        x = self.sampler_state(model_input, timestep)
        state = self.conditional_half_of(x, branches)
        last = self._last
        cached = last is not None and last.index == index and torch.equal(last.state, state)
        through = self.guidance.through_denoiser and not cached
        with torch.inference_mode(False), torch.set_grad_enabled(through):
            x_t = (state / level.scale).detach().clone().requires_grad_(through)
            if through:
                x = (x_t * level.scale).repeat(branches, *[1] * (x_t.dim() - 1))
                bound.arguments[self.input_name] = (x * self.input_scale(timestep, model_input)).to(model_input.dtype)
            output = self.forward(*bound.args, **bound.kwargs)
            prediction, variance = split_learned_variance(
                output[0] if isinstance(output, tuple) else output.sample, x.shape[1]
            )
            x0_hat, prediction = clean_estimate(self.family, prediction, x, level, self.clip_first)
            x0_hat = self.conditional_half_of(x0_hat, branches)  # a view inside the graph
        if cached:
            shift = last.shift
        else:
            update = training_free_update(
                self.guidance,
                x_t,
                x0_hat,
                level,
                self.targets,
                self.classifier_scale,
                self.signal_ratios(),
                self.generator,
                vae=self.vae,
                decode=self.decoder(bound.arguments) if self.vae is not None else self.guidance_input,
                gradient_checkpointing=self.decoder_gradient_checkpointing,
            )
            shift = torch.zeros_like(state) if update.noise_shift is None else update.noise_shift.detach()
            self._last = CachedShift(index, state, shift)
        x = x.detach()
        shift = shift.to(prediction.dtype).repeat(branches, *[1] * (shift.dim() - 1))
        guided = self.family.shift_output(prediction.detach(), shift, x, level)
        guided = guided if variance is None else torch.cat([guided, variance.detach()], dim=1)
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output

    def signal_ratios(self) -> list[float]:
        """The `signal_ratios` of the run the pipeline's scheduler is set to, computed once per `set_timesteps`."""
        timesteps = self.family.scheduler.timesteps
        if self._signal_ratios is None or self._signal_ratios[0] is not timesteps:
            self._signal_ratios = (timesteps, signal_ratios(self.family))
        return self._signal_ratios[1]

    def evaluation(self, timestep) -> tuple[int, torch.Tensor]:
        """(evaluation index, the scheduler's timestep) of a call at the denoiser's `timestep`."""
        scheduler = self.family.scheduler
        value = float(torch.as_tensor(timestep).flatten()[0]) * self.timestep_multiplier
        timesteps = scheduler.timesteps
        index = getattr(scheduler, "step_index", None)
        if index is None:
            index = getattr(scheduler, "begin_index", None)
        if index is None:  # a sampler without a step index (DDPM, DDIM, PNDM) or before its first step
            matches = (timesteps.double() - value).abs() <= 1e-4 * max(abs(value), 1.0)
            if not bool(matches.any()):
                raise ValueError(
                    f"The denoiser was called at timestep {value:g}, which is not one of the scheduler's timesteps; "
                    f"guided cannot place the evaluation."
                )
            first = int(matches.nonzero()[0, 0])
            index = (
                scheduler.index_for_timestep(timesteps[first]) if hasattr(scheduler, "index_for_timestep") else first
            )
        if index >= len(timesteps) or not math.isclose(float(timesteps[index]), value, rel_tol=1e-4, abs_tol=1e-4):
            raise ValueError(
                f"The denoiser was called at timestep {value:g}, but the scheduler's evaluation {index} is at "
                f"timestep {float(timesteps[min(index, len(timesteps) - 1)]):g}; guided cannot place the evaluation."
            )
        return index, timesteps[index]

    def guided_output(
        self,
        model_input: torch.Tensor,
        prediction: torch.Tensor,
        index: int,
        timestep: torch.Tensor,
        level: NoiseLevel,
        arguments: dict,
    ) -> torch.Tensor:
        """The prediction with the score shift of the conditional half's sample added to every CFG branch."""
        branches = self.cfg_branches(model_input.shape[0])
        x = self.sampler_state(model_input, timestep)
        prediction, variance = split_learned_variance(prediction, x.shape[1])
        x0_hat, prediction = clean_estimate(self.family, prediction, x, level, self.clip_first)
        state = self.conditional_half_of(x, branches)
        shift = self.shift(index, state, self.conditional_half_of(x0_hat, branches), level, arguments)
        shift = shift.to(prediction.dtype).repeat(branches, *[1] * (shift.dim() - 1))
        guided = self.family.shift_output(prediction, shift, x, level)
        return guided if variance is None else torch.cat([guided, variance], dim=1)

    def cfg_branches(self, batch: int) -> int:
        """2 where the pipeline doubled the batch for CFG, else 1; any other batch has no target per sample."""
        samples = len(self.targets)
        if batch % samples or batch // samples not in (1, 2):
            raise ValueError(
                f"`targets` has {samples} entries, but the denoiser was called on a batch of {batch}; give one target "
                f"per sample (the batch is doubled under CFG)."
            )
        return batch // samples

    def sampler_state(self, model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The sampler's state x: the denoiser's input divided by the scheduler's `scale_model_input` factor (read off
        a scaled one)."""
        input_scale = self.input_scale(timestep, model_input)
        return model_input if input_scale == 1 else model_input / input_scale

    def input_scale(self, timestep: torch.Tensor, like: torch.Tensor) -> float:
        """The scheduler's `scale_model_input` factor at `timestep` (1 for samplers that feed x as it is), computed in
        the dtype and on the device of `like`."""
        one = torch.ones((), dtype=like.dtype, device=like.device)
        return float(self.family.model_input(one, timestep))

    def conditional_half_of(self, tensor: torch.Tensor, branches: int) -> torch.Tensor:
        """The conditional CFG half of a doubled batch (`CONDITIONAL_FIRST` says which half); all of it without CFG."""
        if branches == 1:
            return tensor
        samples = len(self.targets)
        return tensor[self.conditional_half * samples : (self.conditional_half + 1) * samples]

    def shift(
        self, index: int, state: torch.Tensor, x0_hat: torch.Tensor, level: NoiseLevel, arguments: dict
    ) -> torch.Tensor:
        """The eps shift d of the samples at `state`, reused by a second call at the same state (Flux's true CFG, SD3's
        skip-layer guidance)."""
        last = self._last
        if last is not None and last.index == index and torch.equal(last.state, state):
            return last.shift
        shift = self.guidance_shift(state, x0_hat, level, arguments)
        self._last = CachedShift(index, state, shift)
        return shift

    def guidance_shift(
        self, state: torch.Tensor, x0_hat: torch.Tensor, level: NoiseLevel, arguments: dict
    ) -> torch.Tensor:
        """d = the shift a distilled guide predicts in one pass, or -s sigma grad log p(y | .) (`noise_shift`) of a
        guidance with a gradient, the guide reading its input in its own dtype."""
        if self.guidance.predicts_shift:
            return predicted_shift(
                self.guidance,
                self.vae,
                self.guidance_input(state),
                level,
                self.guidance_input(x0_hat),
                self.targets,
                self.classifier_scale,
            )
        if self.vae is None:
            state, x0_hat = self.guidance_input(state), self.guidance_input(x0_hat)
        grad = level_gradient(
            self.guidance,
            self.vae,
            state,
            level,
            x0_hat,
            self.targets,
            decode=None if self.vae is None else self.decoder(arguments),
            batch_size=self.guidance_batch_size,
            gradient_checkpointing=self.decoder_gradient_checkpointing,
        )
        return noise_shift(grad, level, self.guidance.step_scale(self.classifier_scale, level))

    def guidance_input(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in the guidance's dtype (a guidance without weights reads it as it is)."""
        return tensor if self.guidance_dtype is None else tensor.to(self.guidance_dtype)

    def decoder(self, arguments: dict) -> Callable[[torch.Tensor], torch.Tensor]:
        """latents -> pixels in the guidance's dtype, through the gradient's decoder; packed latents (Flux: (B, tokens,
        features)) are unpacked first with the pipeline's own helper, at the size its `img_ids` give."""
        if arguments[self.input_name].dim() != 3:
            return lambda latents: self.guidance_input(decode_latents(self.vae, latents))
        if not hasattr(self.pipe, "_unpack_latents") or "img_ids" not in arguments:
            raise ValueError(
                f"{type(self.pipe).__name__} passes packed latents (B, tokens, features) without `_unpack_latents` "
                f"and `img_ids`; guided cannot decode them."
            )
        ids, factor = arguments["img_ids"], self.pipe.vae_scale_factor
        height, width = (2 * (int(ids[..., axis].max()) + 1) * factor for axis in (1, 2))
        return lambda latents: self.guidance_input(
            decode_latents(self.vae, self.pipe._unpack_latents(latents, height, width, factor))
        )
