"""Lightning's model summary, without a FLOPs column that nothing measured."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table


class ModelSummary(LightningModelSummary):
    """The layer table Lightning prints at `fit` start; FLOPs only when they were counted.

    Lightning counts FLOPs by running `example_input_array` through the module; the project's jobs have no single
    forward (they sample, noise and route experts), so the column would read 0 for every network and
    "Total FLOPs: 0". Without that input the column and the total are left out. Cost per step is measured
    where it means something (`scripts/guide_table.py`, `benchmarks/`).
    """

    @staticmethod
    def summarize(
        summary_data,
        total_parameters,
        trainable_parameters,
        model_size,
        total_training_modes,
        total_flops,
        **summarize_kwargs,
    ) -> None:
        counted = total_flops > 0
        if not counted:
            summary_data = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *summary_data
        )
        if not counted:
            table = table.rsplit("\n", 1)[0]  # the last line is the FLOPs total
        rank_zero_info("\n" + table)
