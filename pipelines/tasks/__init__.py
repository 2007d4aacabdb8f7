"""Tasks, one per file: what an off-the-shelf model predicts and the losses and log-likelihoods built on it."""

from __future__ import annotations

from torch import nn

from plugguide.pipelines.tasks.base import Task
from plugguide.pipelines.tasks.classification import ClassificationTask
from plugguide.pipelines.tasks.dense_regression import DenseRegressionTask, align_scale_and_shift
from plugguide.pipelines.tasks.segmentation import SegmentationTask

# What a model says it predicts (`predicts` of TimmClassifier, DenseModel and the experts made from them) -> its task.
TASKS_BY_OUTPUT = {"class": ClassificationTask, "class_map": SegmentationTask, "map": DenseRegressionTask}


def default_task(model: nn.Module) -> Task:
    """The task of a model with default settings, from what it says it predicts (a classifier when it does not say)."""
    return TASKS_BY_OUTPUT[getattr(model, "predicts", "class")]()


__all__ = [
    "ClassificationTask",
    "DenseRegressionTask",
    "SegmentationTask",
    "TASKS_BY_OUTPUT",
    "Task",
    "align_scale_and_shift",
    "default_task",
]
