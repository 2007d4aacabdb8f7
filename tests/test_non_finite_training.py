"""A training run stops at its first NaN/inf loss, gradient or weight, naming the step, and never checkpoints non-finite weights."""

from __future__ import annotations

import glob
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from plugguide.callbacks import NonFiniteGuard
from tests.test_cli import ppap_overrides, run


class Line(L.LightningModule):
    """y = w x on constant data; `fault` makes step `at` go wrong in one of the three ways a run turns non-finite."""

    def __init__(self, fault: str, at: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.fault, self.at, self.lr = fault, at, 0.1

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).square().mean()
        if self.global_step + 1 == self.at:
            if self.fault == "loss":
                loss = loss * torch.tensor(float("nan"))
            elif self.fault == "gradient":
                loss = loss + (self.layer.weight * 0).sum().sqrt()  # finite (0), but d sqrt(0) = inf, times 0: NaN
            elif self.fault == "weight":
                loss = loss + 1e3 * self.layer.bias.sum()  # a finite loss and gradient ...
                self.trainer.optimizers[0].param_groups[0]["lr"] = 1e38  # ... whose finite update overflows float32
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(module: L.LightningModule, tmp_path) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[
            NonFiniteGuard(),
            ModelCheckpoint(
                dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=1, save_last=True, save_top_k=-1
            ),
        ],
    )
    trainer.fit(module, DataLoader(torch.ones(64, 4), batch_size=8))
    return trainer


def checkpoint_weights(tmp_path) -> dict[str, dict]:
    return {
        os.path.basename(p): torch.load(p, weights_only=True)["state_dict"]
        for p in glob.glob(str(tmp_path / "checkpoints" / "*.ckpt"))
    }


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("loss", "the training loss is nan"),
        ("gradient", r"the gradients are not finite \(first: layer.weight\)"),
        ("weight", r"the weights became non-finite in the optimizer step \(first: layer.bias\)"),
    ],
)
def test_training_stops_at_the_faulty_step_and_every_checkpoint_is_finite(tmp_path, fault, message):
    with pytest.raises(FloatingPointError, match=rf"Training stopped at step 4: {message}.*learning rate"):
        fit(Line(fault, at=4), tmp_path)
    saved = checkpoint_weights(tmp_path)
    assert "last.ckpt" in saved and len(saved) == 4  # steps 1, 2 and 3, and last: the fourth step's was never written
    for name, state in saved.items():
        assert all(torch.isfinite(value).all() for value in state.values()), name


def test_a_finite_run_is_left_alone(tmp_path):
    trainer = fit(Line("none", at=0), tmp_path)
    assert trainer.global_step == 6 and len(checkpoint_weights(tmp_path)) == 7


def test_the_issues_learning_rate_stops_the_main_job_without_a_non_finite_checkpoint(
    tiny_assets, tmp_path, monkeypatch, capsys
):
    """`lightning fit -c configs/ppap.yaml --model.optimizer.init_args.lr 1e6 --trainer.max_steps 50`: NaN from step ~10 on,
    then last.ckpt with NaN experts and an error at the end-of-fit grid blaming the guidance scale."""
    monkeypatch.chdir(tmp_path)
    overrides = ppap_overrides(tiny_assets)
    overrides["trainer"] |= {
        "max_steps": 50,
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "every_n_train_steps": 1},
            }
        ],
    }
    with pytest.raises(SystemExit) as exit_info:
        run("fit", "ppap.yaml", overrides, tmp_path, "--model.optimizer.init_args.lr", "1e6")
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert "FloatingPointError: Training stopped at step" in message and "now 1e+06" in message, message
    saved = checkpoint_weights(tmp_path / "runs" / "ppap" / "version_0")
    assert "last.ckpt" in saved
    for name, state in saved.items():
        assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point()), name
