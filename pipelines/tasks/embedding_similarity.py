"""Embedding similarity: an image embedder (CLIP, the digits' embedder) scored against a target embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plugguide.pipelines.tasks.base import Task


class EmbeddingSimilarityTask(Task):
    """Outputs (B, D) image embeddings, targets (B, D) embeddings: log p(target | x) = scale * cos(e(x), target).

    CLIP-guided sampling (TFG's style guidance, Ye et al., 2024; EluCD's text-guided samples, Ma et al., 2023) follows
    the gradient of the cosine between the predicted clean image's embedding and the embedding of a prompt or a
    reference image. With `scale` = the embedder's logit scale (CLIP's exp(t), 100 for OpenAI's checkpoints) this is the
    logit the model's own contrastive softmax puts on the pair, log p up to the partition term, which does not depend
    on the target; so a classifier scale means about what it means for class guidance. Targets are per sample, like a
    dense task's maps (`targets=` of the pipelines and `guided`), and need not be unit vectors (their direction
    counts).

    Distilling an embedder into noise-aware experts (PPAP's Eq. 6) uses 1 - cos to the teacher's embedding.

    Args:
        scale (`float`, defaults to 1.0): the factor on the cosine; `default_task` sets the model's `logit_scale`.
        embedding_dim (`int`, *optional*): D, the model's embedding size, so that `check_targets` refuses other
            targets before sampling; None: checked against the outputs at the first gradient.
    """

    def __init__(self, scale: float = 1.0, embedding_dim: int | None = None) -> None:
        if not scale > 0:
            raise ValueError(f"Expected `scale` to be > 0, but got {scale}.")
        if embedding_dim is not None and embedding_dim < 1:
            raise ValueError(f"Expected `embedding_dim` to be >= 1 (or None), but got {embedding_dim}.")
        self.scale = float(scale)
        self.embedding_dim = embedding_dim

    def cosine(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) cosines of each output with its target."""
        return F.cosine_similarity(outputs.float(), targets.to(outputs.device, torch.float32), dim=-1)

    def distillation_loss(self, teacher_outputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return (1 - self.cosine(outputs, teacher_outputs)).mean()

    def supervised_loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (1 - self.cosine(outputs, labels)).mean()

    def log_likelihood(
        self, outputs: torch.Tensor, targets: torch.Tensor, marginal_ratio: float = 1.0
    ) -> torch.Tensor:
        if targets.shape != outputs.shape:
            raise ValueError(
                f"Expected `targets` of embedding-similarity guidance to have the shape of the embedder's outputs on "
                f"these images, {tuple(outputs.shape)} (one embedding per sample), but got {tuple(targets.shape)}."
            )
        if marginal_ratio != 1.0:
            raise ValueError(
                f"A marginal temperature acts on class scores; an embedding similarity has none (`marginal_ratio`="
                f"{marginal_ratio}, expected 1)."
            )
        return self.scale * self.cosine(outputs, targets)

    def prediction(self, outputs: torch.Tensor) -> torch.Tensor:
        return F.normalize(outputs, dim=-1)

    def agreement(self, outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """The mean cosine of the embeddings with the reference embeddings, in [-1, 1]."""
        return self.cosine(outputs, reference).mean()

    def check_targets(self, targets: torch.Tensor, num_classes: int | None) -> None:
        if targets.dim() != 2 or not targets.is_floating_point():
            raise ValueError(
                f"Expected `targets` of embedding-similarity guidance to be one real embedding per sample, (B, D) (the "
                f"embedder's text or image embeddings), but got {targets.dtype} targets of shape {tuple(targets.shape)}."
            )
        if self.embedding_dim is not None and targets.shape[1] != self.embedding_dim:
            raise ValueError(
                f"Expected `targets` of embedding-similarity guidance to have the embedder's {self.embedding_dim} "
                f"dimensions (its projection size), but got {targets.shape[1]}: were they made by another model?"
            )
        if not bool(torch.isfinite(targets).all()):
            raise ValueError("`targets` of embedding-similarity guidance hold NaN or inf values.")
        if targets.numel() and not bool((targets.norm(dim=1) > 0).all()):
            raise ValueError("`targets` of embedding-similarity guidance hold a zero vector, which has no direction.")
