"""A progress bar for step-bounded training (one bar over the optimizer steps of the whole run), and one over the
denoising steps of a sampling batch in `test` and `predict`."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


def denoising_progress(trainer: L.Trainer | None) -> dict:
    """The `set_progress_bar_config` of a pipeline sampling one `test`/`predict` batch: a bar over its denoising steps
    beneath the trainer's `StepProgressBar` (a batch of DDPM-50 is 50 steps, not one tick of "1/1 batches"), none
    under any other bar or none."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if not isinstance(bar, StepProgressBar) or bar.is_disabled:
        return {"disable": True}
    return {"desc": "Denoising", "unit": "steps", "leave": False, "position": 1, "dynamic_ncols": True}


class StepProgressBar(TQDMProgressBar):
    """Counts optimizer steps toward `max_steps` in one bar, when `max_steps` bounds the run.

    Lightning's bars count the batches of each epoch under "Epoch e/max_epochs - 1", which reads "Epoch 48/-2"
    when the run is bounded by `max_steps` alone (the project's training configs). This bar spans the run and
    resumes where a checkpoint left off: `Training (epoch 23): 730/1500 steps`. Runs bounded by epochs get
    Lightning's own bar. In `test` and `predict`, the jobs' pipelines show a second bar over each batch's denoising
    steps (`denoising_progress`). The logger version (`v_num`) is left out: it is in the log directory's name.

    Args:
        refresh_rate (`int`, defaults to 1): update the bar every n steps.
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)

    @staticmethod
    def step_bounded(trainer: L.Trainer) -> bool:
        return trainer.max_steps > 0

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        if not self.step_bounded(trainer):
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.unit = "steps"
        bar.n = trainer.global_step
        bar.set_description(f"Training (epoch {trainer.current_epoch})")
        bar.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not self.step_bounded(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
