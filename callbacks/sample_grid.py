"""Fixed-seed sample grids in TensorBoard, one labelled row per class."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from plugguide.callbacks.labelled_grid import labelled_grid
from plugguide.callbacks.periodic_grid import PeriodicGrid
from plugguide.models import load_classifier
from plugguide.pipelines.finite import check_cfg_scale, check_scale


class GuidedSampleGrid(PeriodicGrid):
    """Samples a grid with the module's `sampling_pipeline()` and logs it to TensorBoard.

    The noise comes from a generator seeded with `seed` at every call, so grids of different epochs
    start from the same noise and differ only by the model. The seed is saved in the checkpoint and
    restored on `--ckpt_path` resume, so a resumed run continues the same series even if the config's
    seed changed. Rows are classes, named in a column on their left, when the pipeline is guided or
    class-conditional, otherwise plain samples; tiles are enlarged 4x (nearest neighbour). Drawn on global rank 0 only.

    Args:
        num_per_class (`int`, defaults to 8): columns of the grid.
        num_classes (`int`, defaults to 10): rows of the grid.
        num_inference_steps (`int`, *optional*): sampler steps; default: the module's `num_inference_steps`
            hyper-parameter or attribute, else 50.
        classifier_scale (`float`, *optional*): the guidance's gradient scale; default: the module's
            `classifier_scale`, else 0.
        guidance_scale (`float`, defaults to 1.0): classifier-free guidance weight g, as in diffusers (1 = off;
            class-conditional UNets).
        every_n_epochs (`int`, defaults to 1): sample after every n-th validation epoch; the last grid is always drawn
            at fit end.
        seed (`int`, defaults to 0): seed of the grid's noise.
        evaluator_path (`str`, *optional*): independent classifier whose agreement with the target rows is logged as
            `<tag>/guided_accuracy`; default: the module's `evaluator_path`, if any.
        tag (`str`, defaults to `"samples"`): TensorBoard tag.
    """

    def __init__(
        self,
        num_per_class: int = 8,
        num_classes: int = 10,
        num_inference_steps: int | None = None,
        classifier_scale: float | None = None,
        guidance_scale: float = 1.0,
        every_n_epochs: int = 1,
        seed: int = 0,
        evaluator_path: str | None = None,
        tag: str = "samples",
    ) -> None:
        super().__init__(every_n_epochs)
        if classifier_scale is not None:
            check_scale("classifier_scale", classifier_scale)
        check_cfg_scale(guidance_scale)
        if num_per_class < 1 or num_classes < 1:
            raise ValueError(
                f"Expected `num_per_class` and `num_classes` to be >= 1, but got {num_per_class} and {num_classes}."
            )
        self.num_per_class = num_per_class
        self.num_classes = num_classes
        self.num_inference_steps = num_inference_steps
        self.classifier_scale = classifier_scale
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.evaluator_path = evaluator_path
        self.tag = tag
        self._evaluator = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tag=self.tag)

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seed = state_dict["seed"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail before training, not at the first grid, when the rows ask for classes the guidance lacks.
        guidance = getattr(pl_module, "guidance", None)  # ExpertDistillation's builds it from the current experts
        classes = getattr(guidance, "num_classes", None)
        if isinstance(classes, int) and self.num_classes > classes:
            raise ValueError(
                f"Expected `num_classes` (grid rows) to be at most the guidance classifier's {classes} classes, but got {self.num_classes}."
            )

    @staticmethod
    def setting(value, pl_module: L.LightningModule, name: str, default):
        """The callback's own value, else the module's hyper-parameter of the same name, else its attribute of that
        name (a halving stage's step count follows from its teacher's), else `default`."""
        if value is not None:
            return value
        return pl_module.hparams.get(name, getattr(pl_module, name, default))

    def labels(self, pipeline, classifier_scale: float) -> torch.Tensor | None:
        targeted = (
            pipeline.guidance is not None
            and classifier_scale > 0
            or pipeline.is_class_conditional
            and self.guidance_scale > 1
        )
        if not targeted:
            return None
        return torch.arange(self.num_classes).repeat_interleave(self.num_per_class)

    @rank_zero_only
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        pipeline = pl_module.sampling_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        classifier_scale = self.setting(self.classifier_scale, pl_module, "classifier_scale", 0.0)
        evaluator_path = self.setting(self.evaluator_path, pl_module, "evaluator_path", None)
        labels = self.labels(pipeline, classifier_scale)
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        with torch.no_grad():
            output = pipeline(
                class_labels=labels,
                batch_size=self.num_classes * self.num_per_class,
                num_inference_steps=self.setting(self.num_inference_steps, pl_module, "num_inference_steps", 50),
                classifier_scale=classifier_scale if pipeline.guidance is not None else 0.0,
                guidance_scale=self.guidance_scale,
                generator=generator,
                output_type="pt",
            )
        rows = None if labels is None else [f"class {k}" for k in range(self.num_classes)]
        grid = labelled_grid(output.images, nrow=self.num_per_class, row_labels=rows)
        step = trainer.global_step
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image(self.tag, grid, step)
        if evaluator_path and labels is not None:
            if self._evaluator is None:
                self._evaluator = load_classifier(evaluator_path, "evaluator_path").eval()
            self._evaluator.to(pl_module.device)
            with torch.no_grad():
                predicted = self._evaluator(output.images * 2 - 1).argmax(-1).cpu()
            accuracy = (predicted == labels).float().mean().item()
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"{self.tag}/guided_accuracy": accuracy}, step)
        pl_module.train(was_training)
