"""The `plugguide` command (also installed as `lightning`): a LightningCLI in subclass mode.

Any LightningModule / LightningDataModule can be named by `class_path` in a config, so one command
runs every job of the project: `plugguide fit -c configs/ppap.yaml`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from plugguide.atomic_checkpoint import AtomicCheckpointIO, job_name
from plugguide.callbacks.model_summary import ModelSummary as ConciseModelSummary
from plugguide.callbacks.non_finite_guard import NonFiniteGuard
from plugguide.callbacks.step_progress_bar import StepProgressBar
from plugguide.checkpoint_settings import check_checkpoint_settings, checkpoint_file
from plugguide.pipelines.tasks import ClassificationTask
from plugguide.project_error import project_error
from plugguide.run_folder import newest_last_checkpoint, next_version, resolve_run_folder
from plugguide.run_logger import RunLogger

# Set to 1 to see the full traceback of an error the project raised about a setting or a file.
TRACEBACK_VARIABLE = "PLUGGUIDE_TRACEBACK"
# Settings that a job and its data both take, with one meaning: given once, under `model:`, and copied to `data:`
# wherever the data class takes them (a class without the setting is left alone).
SHARED_SETTINGS = ("diffusion_model", "prompt")


class DropLightningTips(logging.Filter):
    """Lightning advertises its cloud products ("💡 Tip: ... litlogger") on every run; nothing about this run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def cached_teacher(teacher_path: str | None, task: Namespace | dict | None) -> str | None:
    """`data.teacher_path` from the model's: the classifier whose logits the synthesized set caches with its images.

    A dense teacher (segmenter, depth regressor: a `task` other than classification) caches nothing; it runs on
    every batch.
    """
    class_path = task.get("class_path") if isinstance(task, (Namespace, dict)) else None
    if class_path is None:
        return teacher_path
    module, _, name = class_path.rpartition(".")
    task_class = getattr(importlib.import_module(module), name)
    return teacher_path if task_class.label_key == ClassificationTask.label_key else None  # one class per image


class PlugGuideCLI(LightningCLI):
    """LightningCLI whose runs write into their own folder and whose checkpoints give weights, not settings.

    - Run folder: everything a run writes (logs, `checkpoints/`, exports, samples) goes under
      `<trainer.default_root_dir>/version_N/`. A new run takes the next N; `--ckpt_path last` resumes the newest
      version's `checkpoints/last.ckpt` and keeps writing into that version (see `plugguide.run_folder`). The console
      says which. The TensorBoard logger's HPARAMS hold the run's settings (`RunLogger`).
    - Settings given once: `model.diffusion_model`, `model.prompt` and `model.teacher_path` are copied to the data
      (`add_arguments_to_parser`); the data section does not repeat them.
    - Checks that need the trainer (the job's `max_steps`, the number of processes) run before the subcommand starts,
      before any image is synthesized: the module's and data module's `check_trainer(trainer, stage)`, where defined.
    - Console: a step-counting progress bar and a summary without empty FLOPs, each added only where the config
      chose none of its own (and did not switch it off). `NonFiniteGuard`: every trainer stops at the first NaN/inf
      loss, gradient or weight, before it is checkpointed.
    - `AtomicCheckpointIO`: checkpoints are written whole or not at all, naming the job that wrote them (unless the
      config chose a checkpoint plugin of its own); `--ckpt_path` never loads a damaged one (`checkpoint_file`): named,
      it is refused; under `last`, the newest intact checkpoint of that version is taken, and the console says so.
    - `--ckpt_path`: Lightning replaces the model settings of the config and command line with the checkpoint's
      hyper-parameters, so `--model.classifier_scale 0 --ckpt_path run.ckpt` silently used the trained scale. Here the
      run's settings stand; one line names those that differ from the checkpoint's, and a checkpoint whose weights do
      not fit them (other `num_experts`, `lora_rank`) is refused with the settings named.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in SHARED_SETTINGS:
            parser.link_arguments(f"model.init_args.{name}", f"data.init_args.{name}")
        parser.link_arguments(
            ("model.init_args.teacher_path", "model.init_args.task"),
            "data.init_args.teacher_path",
            compute_fn=cached_teacher,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parses as LightningCLI does, and keeps `--ckpt_path` aside until the classes are built.

        LightningCLI offers no hook to stop it from parsing a checkpoint's hyper-parameters over the run's settings:
        right after this method it reads `config[subcommand].ckpt_path` (its private `_parse_ckpt_path`), and finding
        none leaves the config alone. `before_instantiate_classes` puts the path back (the run's config.yaml records
        it). `tests/test_run_folder.py::test_lightning_parses_the_checkpoint_path_right_after_parse_arguments` fails
        if Lightning changes this order.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        self.requested_ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if self.requested_ckpt_path is not None:
            self.config[subcommand].ckpt_path = None

    def before_instantiate_classes(self) -> None:
        trainer = self._get(self.config, "trainer", default=Namespace())
        self.run_folder = resolve_run_folder(trainer.get("default_root_dir") or os.getcwd(), self.requested_ckpt_path)
        if self.requested_ckpt_path is not None:
            self.config[self.subcommand].ckpt_path = self.requested_ckpt_path
        # A test of a fit's checkpoint writes into the fit's folder: it keeps the fit's config.yaml.
        if self.subcommand not in (None, "fit"):
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config-{self.subcommand}.yaml"}

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        kinds = (ProgressBar, ModelSummary, NonFiniteGuard)
        chosen = {kind: any(isinstance(c, kind) for c in callbacks) for kind in kinds}  # by the config itself
        if trainer_config.get("enable_progress_bar") is not False and not chosen[ProgressBar]:
            callbacks.append(StepProgressBar())
        if trainer_config.get("enable_model_summary") is not False and not chosen[ModelSummary]:
            callbacks.append(ConciseModelSummary())
            kwargs["enable_model_summary"] = False  # Lightning adds no summary of its own (nor says a word about ours)
        if not chosen[NonFiniteGuard]:
            callbacks.append(NonFiniteGuard())
        if trainer_config.get("logger") is False or trainer_config.get("fast_dev_run"):
            # No version folder from a logger (`fast_dev_run` swaps in a dummy): the run's folder is its own root.
            version = self.run_folder.version
            version = next_version(self.run_folder.root) if version is None else version
            kwargs["default_root_dir"] = os.path.join(self.run_folder.root, f"version_{version}")
        elif trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            settings = self.config.get(str(self.subcommand), self.config)
            sections = {"seed_everything": settings.get("seed_everything")}
            for key in ("model", "data"):
                if isinstance(settings.get(key), Namespace):
                    sections[key] = settings[key].as_dict()
            kwargs["logger"] = RunLogger(self.run_folder.root, self.run_folder.version, sections)
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints whole or absent, naming their job
            plugins.append(AtomicCheckpointIO(job=job_name(type(self.model))))
        return super().instantiate_trainer(**kwargs, callbacks=callbacks, plugins=plugins)

    def after_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        checkpoint = self.run_folder.checkpoint
        if self.requested_ckpt_path == "last" and checkpoint is not None:
            # the newest version's checkpoints: its last.ckpt, or the newest intact one when that is damaged
            path = checkpoint_file("last", [os.path.dirname(checkpoint)])
        else:
            path = checkpoint_file(checkpoint, [])
        if path is not None:
            check_checkpoint_settings(path, self.model)
        self.config_init[self.subcommand]["ckpt_path"] = path if path is not None else checkpoint
        self.announce_run_folder(path)

    def announce_run_folder(self, checkpoint: str | None) -> None:
        """One console line: the folder this run writes into, and whether it resumes a checkpoint or starts afresh."""
        folder = self.trainer.log_dir
        if checkpoint is not None:
            rank_zero_info(f"Run folder {folder}: {self.subcommand} from {checkpoint}.")
            return
        note = ""
        if self.requested_ckpt_path in ("last", "best"):
            where = os.path.join(self.run_folder.root, "version_*", "checkpoints")
            note = f" (no {self.requested_ckpt_path} checkpoint under {where})"
        elif self.subcommand == "fit" and (previous := newest_last_checkpoint(self.run_folder.root)) is not None:
            note = f"; `--ckpt_path last` would resume {previous[1]} instead"
        rank_zero_info(f"Run folder {folder}: a new {self.subcommand} run, from step 0{note}.")

    def check_trainer(self, stage: str) -> None:
        """The module's and data module's checks of the trainer, before the subcommand loads or synthesizes a thing."""
        for component in (self.model, self.datamodule):
            check = getattr(component, "check_trainer", None)
            if callable(check):
                check(self.trainer, stage)

    def before_fit(self) -> None:
        self.check_trainer("fit")

    def before_validate(self) -> None:
        self.check_trainer("validate")

    def before_test(self) -> None:
        self.check_trainer("test")

    def before_predict(self) -> None:
        self.check_trainer("predict")


def main(args=None) -> None:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(DropLightningTips())
    # Lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates; nothing the user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    try:
        PlugGuideCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # Every job takes its optimiser under `model:` (the chain schedule copies its state between experts).
            auto_configure_optimizers=False,
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
