"""Stopping a training run at its first non-finite loss, gradient or weight, before any of it is checkpointed."""

from __future__ import annotations

import lightning as L
import torch


class NonFiniteGuard(L.Callback):
    """Stops training with an error naming the step and the likely cause when the loss, a gradient or a weight is NaN/inf.

    A learning rate far too high (`--model.optimizer.init_args.lr 1e6`) makes the loss NaN within a few steps; an
    unguarded run goes on logging NaN, writes `last.ckpt` with NaN weights and fails much later, somewhere else
    (a sample grid, blaming the guidance scale). Checked, every step:

    - before the optimizer step: the loss (recorded before backward) and the gradients, so NaN never reaches the weights;
    - after it: the trainable weights (a finite but huge update can overflow). Lightning runs `ModelCheckpoint` after
      every other callback, so the error comes before the step's checkpoint is written: no checkpoint ever holds
      non-finite weights, and `last.ckpt`, if written, is the last finite state.

    Under fp16 mixed precision the gradient scaler skips steps with inf gradients by design, so only the loss and the
    weights are checked then. Under DDP the ranks decide together (a NaN on one rank stops all of them), so none is
    left waiting in a collective. The CLI adds this callback to every trainer.
    """

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []  # since the last optimizer step (several with gradient accumulation)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().reshape(-1))  # kept on the device: no synchronisation until the step

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        losses, self._losses = (torch.cat(self._losses) if self._losses else torch.zeros(0)), []
        # fp16: the gradient scaler skips steps with inf gradients on purpose (and lowers its scale).
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        grads = [] if scaled else [(name, p.grad) for name, p in pl_module.named_parameters() if p.grad is not None]
        if self.all_ranks_finite(trainer, self.finite([losses] + [grad for _, grad in grads])):
            return
        bad_losses = losses[~torch.isfinite(losses)]
        bad_grads = [name for name, grad in grads if not bool(torch.isfinite(grad).all())]
        if len(bad_losses):
            what = f"the training loss is {float(bad_losses[0]):g}"
        elif bad_grads:
            what = f"the gradients are not finite (first: {bad_grads[0]})"
        else:
            what = "the loss or the gradients of another process are not finite"
        self.stop(what, trainer.global_step + 1, optimizer, "before the optimizer step; no weight was updated with it")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        if not self.all_ranks_finite(trainer, self.finite([p.detach() for _, p in named])):
            first = next((name for name, p in named if not bool(torch.isfinite(p).all())), "on another process")
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self.stop(
                f"the weights became non-finite in the optimizer step (first: {first})",
                trainer.global_step,
                optimizer,
                "before this step's checkpoint",
            )

    @staticmethod
    def finite(tensors: list[torch.Tensor]) -> torch.Tensor | bool:
        return torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else True

    @staticmethod
    def all_ranks_finite(trainer: L.Trainer, finite: torch.Tensor | bool) -> bool:
        return not trainer.strategy.reduce_boolean_decision(not bool(finite), all=False)

    @staticmethod
    def stop(what: str, step: int, optimizer: torch.optim.Optimizer | None, when: str) -> None:
        rates = sorted({group["lr"] for group in optimizer.param_groups}) if optimizer is not None else []
        rate = f" (`--model.optimizer.init_args.lr`, now {', '.join(f'{lr:g}' for lr in rates)})" if rates else ""
        raise FloatingPointError(
            f"Training stopped at step {step}: {what}. It was caught {when}, so every checkpoint written holds finite weights. "
            f"Likely cause: a learning rate too high for this model{rate}; lower it, or look for NaN/inf in the data."
        )
