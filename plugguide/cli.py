"""The `lightning` command: a LightningCLI in subclass mode.

Any LightningModule / LightningDataModule can be named by `class_path` in a config, so one command
runs every job of the project: `lightning fit -c configs/ppap.yaml`.
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI

from plugguide.callbacks.model_summary import ModelSummary as ConciseModelSummary
from plugguide.callbacks.step_progress_bar import StepProgressBar


class DropLightningTips(logging.Filter):
    """Lightning advertises its cloud products ("💡 Tip: ... litlogger / litmodels") on every run; nothing about this run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


class PlugGuideCLI(LightningCLI):
    """LightningCLI whose trainers get the project's console: a step-counting progress bar and a summary without empty FLOPs.

    Both are added only where the config chose none of its own (and did not switch them off).
    """

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        if trainer_config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks.append(ConciseModelSummary())
            kwargs["enable_model_summary"] = False  # Lightning adds no summary of its own (and says nothing about ours)
        return super().instantiate_trainer(**kwargs, callbacks=callbacks)


def main(args=None) -> None:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(DropLightningTips())
    # Lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates; nothing the user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    PlugGuideCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
