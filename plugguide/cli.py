"""The `lightning` command: a LightningCLI in subclass mode.

Any LightningModule / LightningDataModule can be named by `class_path` in a config, so one command
runs every job of the project: `lightning fit -c configs/ppap.yaml`.
"""

from __future__ import annotations

import linecache
import logging
import os
import sys
import warnings

from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from plugguide.atomic_checkpoint import AtomicCheckpointIO, job_name
from plugguide.callbacks.model_summary import ModelSummary as ConciseModelSummary
from plugguide.callbacks.non_finite_guard import NonFiniteGuard
from plugguide.callbacks.step_progress_bar import StepProgressBar
from plugguide.checkpoint_settings import check_checkpoint_settings, checkpoint_file

# Set to 1 to see the full traceback of an error the project raised about a setting or a file.
TRACEBACK_VARIABLE = "PLUGGUIDE_TRACEBACK"
PROJECT_ERRORS = (ValueError, OSError, TypeError, RuntimeError, FloatingPointError)


class DropLightningTips(logging.Filter):
    """Lightning advertises its cloud products ("💡 Tip: ... litlogger / litmodels") on every run; nothing about this run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


class PlugGuideCLI(LightningCLI):
    """LightningCLI whose trainers get the project's console and guard, and whose checkpoints give weights, not settings.

    - Console: a step-counting progress bar and a summary without empty FLOPs, each added only where the config
      chose none of its own (and did not switch it off).
    - `NonFiniteGuard`: every trainer stops at the first NaN/inf loss, gradient or weight, before it is checkpointed.
    - `AtomicCheckpointIO`: checkpoints are written whole or not at all, naming the job that wrote them (unless the
      config chose a checkpoint plugin of its own); `--ckpt_path` never loads a damaged one (`checkpoint_file`).
    - `--ckpt_path`: Lightning replaces the model settings of the config and command line with the checkpoint's
      hyper-parameters, so `lightning test --model.guidance_scale 0 --ckpt_path run.ckpt` silently tested the trained
      scale. Here the run's settings stand; one line names those that differ from the checkpoint's, and a checkpoint
      whose weights do not fit them (other `num_experts`, `lora_rank`) is refused with the settings named.
    """

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        if trainer_config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks.append(ConciseModelSummary())
            kwargs["enable_model_summary"] = False  # Lightning adds no summary of its own (and says nothing about ours)
        if not any(isinstance(c, NonFiniteGuard) for c in callbacks):
            callbacks.append(NonFiniteGuard())
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints whole or absent, naming their job
            plugins.append(AtomicCheckpointIO(job=job_name(type(self.model))))
        return super().instantiate_trainer(**kwargs, callbacks=callbacks, plugins=plugins)

    def _parse_ckpt_path(self) -> None:
        """Leaves the config alone: the checkpoint's hyper-parameters do not replace the run's settings (see the class)."""

    def _run_subcommand(self, subcommand: str) -> None:
        path = checkpoint_file(self.config_init[subcommand].get("ckpt_path"), self.trainer)
        if path is not None:
            check_checkpoint_settings(path, self.model)
            self.config_init[subcommand]["ckpt_path"] = path  # the intact file, not Lightning's newest last.ckpt
        super()._run_subcommand(subcommand)


def project_error(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain that a `raise` of this project's code threw about a setting or a file, if any.

    jsonargparse wraps a constructor's error in its own (a Union of subclasses, with a Namespace dump); the
    project's message is the cause inside it.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frame = error.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        if isinstance(error, PROJECT_ERRORS) and frame is not None:
            module = frame.tb_frame.f_globals.get("__name__", "")
            line = linecache.getline(frame.tb_frame.f_code.co_filename, frame.tb_lineno).strip()
            if module.startswith("plugguide.") and line.startswith("raise"):  # a deliberate raise, not a bug's
                return error
        error = error.__cause__ or error.__context__
    return None


def main(args=None) -> None:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(DropLightningTips())
    # Lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates; nothing the user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    try:
        PlugGuideCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as error:
        own = project_error(error)
        if own is None or os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        # The project's message, plainly: not at the end of ~70 lines of jsonargparse traceback and Namespace dump.
        sys.stderr.write(f"\n{type(own).__name__}: {own}\n({TRACEBACK_VARIABLE}=1 shows the full traceback.)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
