"""PPAP expert distillation: noise-range experts learn an off-the-shelf model's clean-image predictions."""

from __future__ import annotations

import copy
from typing import Literal

import lightning as L
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info

from plugguide.callbacks.step_progress_bar import denoising_progress
from plugguide.metrics import GuidedSampleScores, majority_digit
from plugguide.models import (
    MultiExpertModel,
    check_classifier_input,
    load_off_the_shelf,
    load_scheduler,
    load_unet,
    prompt_conditioning,
)
from plugguide.models.multi_expert_model import ConvLora, Finetune
from plugguide.models.seeding import image_seed, step_generator
from plugguide.modules.frozen_networks import FrozenNetworksModule
from plugguide.pipelines import GuidedDiffusionPipeline, sample_batch
from plugguide.pipelines.finite import check_scale
from plugguide.pipelines.guidance import ExpertGuidance, NaiveClassifierGuidance
from plugguide.pipelines.tasks import ClassificationTask, Task


def check_unused_parameters(strategy: Strategy, num_experts: int) -> None:
    """Refuses DDP without `find_unused_parameters` for more than one expert, naming the strategy that has it.

    A step trains one expert, so the others' parameters get no gradient, and plain DDP waits for them and fails at the
    second step. Read off the `DistributedDataParallel` wrapper, which the strategy has built before `on_fit_start`.
    """
    wrapper = strategy.model if isinstance(strategy, DDPStrategy) else None
    if num_experts > 1 and wrapper is not None and getattr(wrapper, "find_unused_parameters", True) is False:
        raise ValueError(
            f"ExpertDistillation trains one of its {num_experts} experts per step, so the others' parameters get no gradient and "
            "DDP must not wait for them: set `trainer.strategy` to 'ddp_find_unused_parameters_true' (or DDPStrategy(find_unused_parameters=True))."
        )


class ExpertDistillation(FrozenNetworksModule):
    """Data-free knowledge transfer to N noise-range experts (PPAP, Go et al., 2023, Sec. 4).

    For a clean image x0~ and expert n, with t ~ U[b_n, b_{n+1}) and x_t = sqrt(abar_t) x0~ + sqrt(1 - abar_t) eps:
        L_n = L( sg(f(x0~)), f_n(x_t) )                                         (Eq. 6)
    f the frozen off-the-shelf model (teacher) and L the task's loss (`pipelines.tasks`): for a classifier Eq. 7,
    KL( softmax(f(x0~) / tau) || softmax(f_n(x_t)) ) (`batchmean`, the KL itself), per pixel for a segmenter, the
    maps' squared error for a depth regressor. `supervision="labels"` trains on the real labels instead (the paper's
    supervised rows).

    Each expert gets 1/N of `max_steps`: "round_robin" trains expert k mod N at step k, all starting from the
    teacher, so grids mean something from the first epoch; "chain" (the authors' schedule) trains them from the lowest
    range up, expert n + 1 starting from expert n's parameters, BatchNorm statistics and AdamW state. Both depend on
    the step alone and a step's t and noise on (`seed`, step, rank), so a resumed run draws what an uninterrupted one
    would. Under DDP the idle experts get no gradient: run with `ddp_find_unused_parameters_true`.

    `lightning test` samples one image per real test image, guided toward its label (dense experts: toward the
    teacher's map of it), seeded by `image_seed(seed, index)`, and scores them with `GuidedSampleScores` (guided
    accuracy, FID, IS by the independent evaluator; map scores from the samples' pixels), so one device and eight give
    the same numbers. Measured in docs/results/ppap.md and docs/results/dense.md.

    Args:
        teacher_path (`str`, defaults to `"assets/digits/classifier-resnet"`): the off-the-shelf model (`TimmClassifier`
            or `DenseModel` directory, or a hub id); also the experts' backbone.
        diffusion_model (`str`, defaults to `"assets/digits/ddpm-uncond"`): the frozen diffusion model whose noise
            schedule the experts learn and which samples grids and tests.
        num_experts (`int`, defaults to 5): N (1 = the paper's single noise-aware classifier).
        finetune (`str`, defaults to `"lora"`): "lora" (LoRA + per-expert norms and head) or "full" (one copy each).
        lora_rank (`int`, defaults to 16): LoRA rank r.
        lora_alpha (`float`, defaults to 8.0): LoRA alpha (update scaled by alpha / r).
        target_modules (`str` or `list[str]`, *optional*): LoRA targets; default per model family
            (`MultiExpertModel`).
        per_expert_head (`bool`, defaults to `True`): each LoRA expert owns a copy of the head (False: the authors'
            shared frozen head).
        conv_lora (`str`, defaults to `"peft"`): LoRA on convolutions, "peft" (rank <= r) or "loralib" (the
            authors' form, rank up to r k; `MultiExpertModel`).
        per_expert_biases (`bool`, defaults to `False`): each expert also owns every bias its LoRA, norms and head
            do not hold (the authors' ViT/DeiT adapters).
        expert_schedule (`str`, defaults to `"round_robin"`): "round_robin" or "chain" (see above).
        supervision (`str`, defaults to `"teacher"`): "teacher" (data-free) or "labels" (the labelled data's
            `label_key`).
        temperature (`float`, defaults to 0.25): tau of the teacher's softmax for the default (classifier) task.
        task (`Task`, *optional*): what the teacher predicts and the loss (`ClassificationTask`, `SegmentationTask`,
            `DenseRegressionTask`); None: image classification with `temperature`.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory (AdamW in the paper).
        scheduler (`str`, defaults to `"DDPMScheduler"`): diffusers sampler of grids and tests.
        num_inference_steps (`int`, defaults to 50): sampler steps of grids and tests.
        classifier_scale (`float`, defaults to 10.0): scale s of the experts' gradient for grids and tests.
        evaluator_path (`str`, *optional*, defaults to `"assets/digits/evaluator"`): independent classifier that scores
            test samples.
        autoencoder_path (`str`, *optional*, defaults to `"assets/digits/autoencoder"`): `AutoencoderKL` whose latents
            are one more feature space of the test's quality metrics.
        seed (`int`, defaults to 0): seed of the training steps' timesteps and noise and of the test samples' noise.
        prompt (`str`, *optional*): for a text-conditional diffusion model, the prompt of grids and tests; None: the
            empty prompt (unconditional, as the paper guides GLIDE).
    """

    frozen_networks = ("teacher", "unet", "scores")

    def __init__(
        self,
        teacher_path: str = "assets/digits/classifier-resnet",
        diffusion_model: str = "assets/digits/ddpm-uncond",
        num_experts: int = 5,
        finetune: Finetune = "lora",
        lora_rank: int = 16,
        lora_alpha: float = 8.0,
        target_modules: str | list[str] | None = None,
        per_expert_head: bool = True,
        conv_lora: ConvLora = "peft",
        per_expert_biases: bool = False,
        expert_schedule: Literal["round_robin", "chain"] = "round_robin",
        supervision: Literal["teacher", "labels"] = "teacher",
        temperature: float = 0.25,
        task: Task | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: str = "DDPMScheduler",
        num_inference_steps: int = 50,
        classifier_scale: float = 10.0,
        evaluator_path: str | None = "assets/digits/evaluator",
        autoencoder_path: str | None = "assets/digits/autoencoder",
        seed: int = 0,
        prompt: str | None = None,
    ) -> None:
        super().__init__()
        if supervision not in ("teacher", "labels"):
            raise ValueError(f"Expected `supervision` to be 'teacher' or 'labels', but got {supervision!r}.")
        if expert_schedule not in ("round_robin", "chain"):
            raise ValueError(
                f"Expected `expert_schedule` to be 'round_robin' or 'chain', but got {expert_schedule!r}."
            )
        self.task = ClassificationTask(temperature) if task is None else task
        check_scale("classifier_scale", classifier_scale)
        if num_inference_steps < 1:
            raise ValueError(f"Expected `num_inference_steps` to be >= 1, but got {num_inference_steps}.")
        if seed < 0:
            raise ValueError(f"Expected `seed` to be >= 0, but got {seed}.")
        self.save_hyperparameters(ignore=["optimizer", "task"])  # the task's settings are in the run's config.yaml
        self.optimizer = optimizer
        self.noise_scheduler = DDPMScheduler.from_config(
            load_scheduler(diffusion_model, "DDPMScheduler", "model.diffusion_model", "model.diffusion_model").config
        )
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.teacher = load_off_the_shelf(teacher_path, "model.teacher_path").eval().requires_grad_(False)
        # The experts' settings, passed on by name: LightningCLI reads each from this job's own signature.
        self.experts = MultiExpertModel(
            # A second load, not `self.teacher`: building a model draws from the global RNG, which peft's LoRA
            # initialisation reads next, so this load keeps the experts (and every table) as they were trained.
            load_off_the_shelf(teacher_path, "model.teacher_path"),
            num_experts=num_experts,
            num_train_timesteps=num_train_timesteps,
            finetune=finetune,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            target_modules=target_modules,
            per_expert_head=per_expert_head,
            conv_lora=conv_lora,
            per_expert_biases=per_expert_biases,
        )
        self.unet = load_unet(diffusion_model, "model.diffusion_model").eval().requires_grad_(False)
        self.scheduler = load_scheduler(diffusion_model, scheduler, "model.scheduler", "model.diffusion_model")
        self.conditioning = prompt_conditioning(diffusion_model, self.unet, prompt)
        check_classifier_input(
            self.teacher, self.unet.config.in_channels, self.unet.config.sample_size, "teacher_path", teacher_path
        )
        self.scores = None
        if evaluator_path:
            # Dense experts: the evaluator reads the digit, the maps come from the pixels.
            map_kind = {"class": None, "class_map": "segmentation"}.get(self.teacher.predicts, "depth")
            self.scores = GuidedSampleScores.from_paths(evaluator_path, autoencoder_path, map_kind)
            evaluator = self.scores.evaluator
            mismatch = evaluator.num_classes != self.teacher.num_classes or evaluator.in_chans != self.teacher.in_chans
            if map_kind is None and mismatch:
                raise ValueError(
                    f"`evaluator_path`={evaluator_path!r} scores {evaluator.num_classes} classes of {evaluator.in_chans}-channel images, "
                    f"but the experts guide toward {self.teacher.num_classes} classes of {self.teacher.in_chans}-channel images; they must match."
                )
        report = self.experts.parameter_report()
        rank_zero_info(
            f"{num_experts} {finetune} experts: {report['trainable_total']:,} trainable parameters "
            f"({report['trainable_percent_of_backbone']:.1f}% of the {report['backbone_parameters']:,}-parameter backbone)"
        )

    def check_trainer(self, trainer: L.Trainer, stage: str) -> None:
        """Refuses a trainer this job cannot run under; the CLI calls it before any image is synthesized."""
        if stage == "fit" and self.hparams.expert_schedule == "chain" and trainer.max_steps < self.experts.num_experts:
            raise ValueError(
                f"`model.expert_schedule`='chain' gives each of the `model.num_experts`={self.experts.num_experts} "
                f"experts `trainer.max_steps` / `num_experts` steps, so it needs `trainer.max_steps` >= "
                f"{self.experts.num_experts}, but got {trainer.max_steps}."
            )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._trainer is not None:
            self.check_trainer(self.trainer, stage)

    def on_fit_start(self) -> None:
        check_unused_parameters(self.trainer.strategy, self.experts.num_experts)
        if self.logger is not None:
            self.logger.log_metrics({f"params/{k}": float(v) for k, v in self.experts.parameter_report().items()}, 0)

    def noised(
        self, images: torch.Tensor, expert: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t for t ~ U[b_n, b_{n+1}), expert n's range."""
        low, high = int(self.experts.boundaries[expert]), int(self.experts.boundaries[expert + 1])
        timesteps = torch.randint(low, high, (images.shape[0],), generator=generator, device=images.device)
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        return self.noise_scheduler.add_noise(images, noise, timesteps), timesteps

    def teacher_outputs(self, batch: dict) -> torch.Tensor:
        """f(x0~), from the cache when the data module stored a classifier teacher's logits (setup checked it is this one)."""
        logits = batch.get("teacher_logits") if self.teacher.predicts == "class" else None
        if logits is None:
            with torch.no_grad():
                logits = self.teacher(batch["image"])
        return logits

    def _step(self, batch: dict, stage: str, expert: int, generator: torch.Generator | None = None) -> torch.Tensor:
        x_t, timesteps = self.noised(batch["image"], expert, generator)
        outputs = self.experts(x_t, timesteps)
        if self.hparams.supervision == "teacher":
            teacher_outputs = self.teacher_outputs(batch)
            loss = self.task.distillation_loss(teacher_outputs, outputs)
            reference = self.task.prediction(teacher_outputs)
        else:
            reference = self.labels(batch)
            loss = self.task.supervised_loss(outputs, reference)
        agreement = self.task.agreement(outputs, reference)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step, prog_bar=on_step)
        self.log(f"{stage}/expert_{expert}/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/expert_{expert}/agreement", agreement, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def expert_at(self, step: int) -> int:
        """The expert that trains at optimizer step `step` under `expert_schedule`."""
        num_experts = self.experts.num_experts
        if self.hparams.expert_schedule == "round_robin":
            return step % num_experts
        return min(step // self.steps_per_expert(), num_experts - 1)

    def steps_per_expert(self) -> int:
        return -(-self.trainer.max_steps // self.experts.num_experts)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        expert = self.expert_at(step)
        if self.hparams.expert_schedule == "chain" and expert > 0 and step == expert * self.steps_per_expert():
            self.continue_chain(expert)
        generator = step_generator(self.hparams.seed, step, self.global_rank, batch["image"].device)
        return self._step(batch, "train", expert, generator)

    def continue_chain(self, expert: int) -> None:
        """Expert n starts where expert n - 1 ended: its parameters, BatchNorm statistics and AdamW moments."""
        optimizer = self.optimizers().optimizer
        for source, target in self.experts.copy_expert(expert - 1, expert):
            if source in optimizer.state:
                optimizer.state[target] = copy.deepcopy(optimizer.state[source])

    def labels(self, batch: dict) -> torch.Tensor:
        """The real labels of the task in a labelled batch (`label_key`), with a clear error where the data has none."""
        key = self.task.label_key
        if key not in batch:
            raise ValueError(
                f"`supervision`='labels' needs the labelled data's {key!r} for a {type(self.task).__name__}, but its batches "
                f"carry {sorted(batch)} (DigitMapsDataModule gives the digits' maps)."
            )
        return batch[key]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Real labelled images, every expert on its own noise range, fixed noise: accuracy vs the true label; dense experts,
        # without maps in the data, are compared with what the teacher sees in the clean image (`agreement`).
        generator = torch.Generator(batch["image"].device).manual_seed(batch_idx)
        if self.task.label_key in batch:
            name, reference = "accuracy", batch[self.task.label_key]
        else:
            name, reference = "agreement", self.task.prediction(self.teacher(batch["image"]))
        for expert in range(self.experts.num_experts):
            x_t, timesteps = self.noised(batch["image"], expert, generator)
            self.log(
                f"val/expert_{expert}/{name}",
                self.task.agreement(self.experts(x_t, timesteps), reference),
                on_epoch=True,
                sync_dist=True,
            )

    @property
    def guidance(self) -> ExpertGuidance:
        """The current experts as a guidance (for callbacks: grids, calibration curves); they keep training."""
        return ExpertGuidance(self.experts, task=self.task)

    def sampling_pipeline(self) -> GuidedDiffusionPipeline:
        return GuidedDiffusionPipeline(self.unet, self.scheduler, self.guidance, **self.conditioning)

    def naive_sampling_pipeline(self) -> GuidedDiffusionPipeline:
        """The same sampler guided by the teacher itself on x_t, the baseline the experts are compared with."""
        return GuidedDiffusionPipeline(
            self.unet, self.scheduler, NaiveClassifierGuidance(self.teacher, task=self.task)
        )

    def on_test_start(self) -> None:
        if self.trainer.ckpt_path is None and self.trainer.global_step == 0:
            raise ValueError(
                "`lightning test` scores trained experts, but no checkpoint was loaded and these experts are untrained "
                "(their guidance is the off-the-shelf classifier's): pass `--ckpt_path last` (the last checkpoint of "
                "the newest version folder under `trainer.default_root_dir`) or the path of a checkpoint."
            )

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if self.scores is None:
            raise ValueError("`lightning test` scores guided samples with the evaluator: set `evaluator_path`.")
        if "index" not in batch:
            raise ValueError(
                "`lightning test` needs test batches with an `index` (each image's position in the test set), which seeds its sample "
                "and counts it once on any number of processes; ImageDataModule and DigitsDataModule provide it."
            )
        pipeline = self.sampling_pipeline()
        pipeline.set_progress_bar_config(**denoising_progress(self._trainer))
        labels, indices = batch["label"], batch["index"]
        seeds = [image_seed(self.hparams.seed, int(index)) for index in indices]
        settings = dict(
            num_inference_steps=self.hparams.num_inference_steps, classifier_scale=self.hparams.classifier_scale
        )
        self.scores.update_real(batch["image"], labels, indices)
        if self.teacher.predicts == "class":
            images = sample_batch(pipeline, {"label": labels, "seed": seeds}, **settings)
            self.scores.update(images, labels, indices)
            return
        # Dense experts: toward the teacher's map of the real image (PPAP Sec. 5.2), scored from the samples' pixels.
        maps = self.task.prediction(self.teacher(batch["image"]))
        images = sample_batch(
            pipeline, {"label": torch.full_like(labels, -1), "seed": seeds, "target_map": maps}, **settings
        )
        # The digit a segmentation map names is its majority stroke class; a depth map names none: the real digit's.
        targets = majority_digit(maps) if self.teacher.predicts == "class_map" else labels
        self.scores.update(images, targets, indices, target_maps=maps)

    def on_test_epoch_end(self) -> None:
        # Computed over every process's samples.
        self.log_dict({f"test/{k}": v for k, v in self.scores.compute().items()})
        self.scores.reset()

    def configure_optimizers(self):
        # All experts' parameters: peft marks only the active adapter trainable, and inactive experts get
        # no gradient in a step, which AdamW skips (no update, no weight decay).
        return self.optimizer([p for n in range(self.experts.num_experts) for p in self.experts.expert_parameters(n)])

    def export(self, directory: str) -> None:
        """Saves the experts (peft adapters or full copies) with their timestep ranges, loadable without Lightning."""
        self.experts.save_pretrained(directory)
