"""Tasks, one per file: what an off-the-shelf model predicts and the losses and log-likelihoods built on it."""

from __future__ import annotations

from torch import nn

from plugguide.pipelines.tasks.base import Task
from plugguide.pipelines.tasks.classification import ClassificationTask
from plugguide.pipelines.tasks.dense_regression import DenseRegressionTask, align_scale_and_shift
from plugguide.pipelines.tasks.embedding_similarity import EmbeddingSimilarityTask
from plugguide.pipelines.tasks.segmentation import SegmentationTask

# What a model says it predicts (`predicts` of TimmClassifier, DenseModel, the embedders and the experts made from
# them) -> its task.
TASKS_BY_OUTPUT = {
    "class": ClassificationTask,
    "class_map": SegmentationTask,
    "map": DenseRegressionTask,
    "embedding": EmbeddingSimilarityTask,
}


def default_task(model: nn.Module) -> Task:
    """The task of a model with default settings, from what it says it predicts (a classifier when it does not say);
    an embedder's scores at its own logit scale and checks targets against its embedding size."""
    predicts = getattr(model, "predicts", "class")
    if predicts == "embedding":
        return EmbeddingSimilarityTask(scale=model.logit_scale, embedding_dim=model.embedding_dim)
    return TASKS_BY_OUTPUT[predicts]()


__all__ = [
    "ClassificationTask",
    "DenseRegressionTask",
    "EmbeddingSimilarityTask",
    "SegmentationTask",
    "TASKS_BY_OUTPUT",
    "Task",
    "align_scale_and_shift",
    "default_task",
]
