"""The TensorBoard logger of a run folder, whose hyper-parameters are the run's settings."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger


def flat_settings(settings: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config sections as `{"model.optimizer.lr": 0.001, "data.num_images": 4000, ...}`.

    `init_args` levels are dropped (a `class_path` stays, under the name of the setting it configures), so the keys
    read like the command line's `--model.optimizer.lr`.
    """
    rows = {}
    for key, value in settings.items():
        if key.startswith("_") or key == "__path__":
            continue
        name = prefix if key == "init_args" else f"{prefix}{key}."
        if isinstance(value, dict):
            rows |= flat_settings(value, name)
        elif key == "class_path":
            rows[prefix.rstrip(".") or "class_path"] = value
        else:
            rows[name.rstrip(".")] = (
                list(value) if isinstance(value, tuple) else value
            )  # hparams.yaml stays plain YAML
    return rows


class RunLogger(TensorBoardLogger):
    """A `TensorBoardLogger` writing `<save_dir>/version_N/`, whose HPARAMS are the run's `model` and `data` settings.

    Lightning logs the module's `save_hyperparameters` alone, without the optimiser (a factory, not a value) or the
    data; this logger logs the run's whole `model` and `data` sections instead, flattened (`model.optimizer.lr`,
    `model.classifier_scale`, `data.num_images`). No `hp_metric` placeholder: the jobs' metrics are their own scalars.

    Args:
        save_dir (str): the job's folder (`trainer.default_root_dir`); the run writes `<save_dir>/version_N/`.
        version (int | None, default None): N; None: the next free one.
        settings (dict | None, default None): the run's config sections, as the CLI parsed them.
    """

    def __init__(self, save_dir: str, version: int | None = None, settings: dict | None = None) -> None:
        super().__init__(save_dir, name="", version=version, default_hp_metric=False)
        self.settings = flat_settings(settings or {})

    def log_hyperparams(self, params: Any, metrics: dict | None = None) -> None:
        super().log_hyperparams(self.settings or params, metrics)
