"""Nothing damaged is ever read back: faults made on purpose, as a new user would (docs/reliability.md)."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from tests.test_cli import refused, run

# ------------------------------------------------------------------------------------------------------
# Checkpoints: whole or absent; a damaged one is named, never loaded.
# ------------------------------------------------------------------------------------------------------
CHECKPOINTS = "runs/pretrain/classifier-resnet/checkpoints"


def classifier_overrides(max_epochs: int) -> dict:
    """The classifier pretraining job in miniature: 2 batches an epoch, a checkpoint every epoch and a last.ckpt."""
    return {
        "trainer": {
            "max_epochs": max_epochs,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "check_val_every_n_epoch": 1,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": CHECKPOINTS, "save_last": True, "save_top_k": -1},
                }
            ],
        },
        "model": {
            "init_args": {
                "classifier": {
                    "init_args": {
                        "model_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16], "stem_width": 8}
                    }
                }
            }
        },
        "data": {"init_args": {"batch_size": 8}},
    }


def fit_classifier(tmp_path, max_epochs: int, *extra: str) -> None:
    run("fit", "pretrain/classifier_resnet.yaml", classifier_overrides(max_epochs), tmp_path, *extra)


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, caplog):
    """ENOSPC while writing epoch 2's checkpoint: no partial file under any name, `--ckpt_path last` resumes from epoch 1."""
    import plugguide.atomic_checkpoint as atomic

    monkeypatch.chdir(tmp_path)
    fit_classifier(tmp_path, 1)
    real_save, saves = torch.save, []

    def save_until_full(checkpoint, file):
        saves.append(checkpoint["epoch"])
        real_save(checkpoint, file)
        os.truncate(file.name, 3000)  # what reached the disk before it filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.torch, "save", save_until_full)
    with pytest.raises(OSError, match="No space left"):
        fit_classifier(tmp_path, 2, "--ckpt_path", "last")
    monkeypatch.setattr(atomic.torch, "save", real_save)
    assert saves, "the patched save was never reached"
    names = sorted(os.listdir(CHECKPOINTS))
    assert names == ["epoch=0-step=2.ckpt", "last.ckpt"], names  # no temporary file left, nothing overwritten
    assert torch.load(f"{CHECKPOINTS}/last.ckpt", weights_only=False)["epoch"] == 0
    fit_classifier(tmp_path, 2, "--ckpt_path", "last")  # disk freed: the run resumes from the whole checkpoint
    assert torch.load(f"{CHECKPOINTS}/last.ckpt", weights_only=False)["global_step"] == 4


def truncate(path: str, fraction: float = 0.9) -> None:
    os.truncate(
        path, int(os.path.getsize(path) * fraction)
    )  # a copy cut short by a full disk, as Lightning's staging left it


def test_a_truncated_last_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fit_classifier(tmp_path, 2)
    truncate(f"{CHECKPOINTS}/last.ckpt")
    with pytest.warns(UserWarning, match=r"skipping damaged .*last\.ckpt .*resuming from .*epoch=1-step=4\.ckpt"):
        fit_classifier(tmp_path, 3, "--ckpt_path", "last")
    assert (
        torch.load(f"{CHECKPOINTS}/epoch=2-step=6.ckpt", weights_only=False)["global_step"] == 6
    )  # resumed at step 4, not from scratch


def test_an_explicitly_named_damaged_checkpoint_is_refused_naming_it_and_the_intact_ones(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    fit_classifier(tmp_path, 1)
    truncate(f"{CHECKPOINTS}/last.ckpt")
    printed = refused(
        capsys,
        "test",
        "pretrain/classifier_resnet.yaml",
        classifier_overrides(1),
        tmp_path,
        "--ckpt_path",
        f"{CHECKPOINTS}/last.ckpt",
    )
    assert "`ckpt_path`='runs/pretrain/classifier-resnet/checkpoints/last.ckpt' is damaged" in printed, printed
    assert "intact beside it: epoch=0-step=2.ckpt" in printed and "PytorchStreamReader" not in printed, printed
    truncate(f"{CHECKPOINTS}/epoch=0-step=2.ckpt")
    printed = refused(
        capsys, "test", "pretrain/classifier_resnet.yaml", classifier_overrides(1), tmp_path, "--ckpt_path", "last"
    )
    assert "every checkpoint in" in printed and "is damaged" in printed, printed


@pytest.mark.parametrize("cut", [0, 22, 0.5, 0.999])
def test_checkpoint_damage_finds_every_cut(tmp_path, cut):
    from plugguide.atomic_checkpoint import checkpoint_damage

    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {"weight": torch.randn(64, 64)}, "epoch": 3}, path)
    assert checkpoint_damage(path) is None
    os.truncate(path, cut if isinstance(cut, int) else int(os.path.getsize(path) * cut))
    assert checkpoint_damage(path) is not None


def test_another_jobs_checkpoint_is_refused_naming_the_job_that_wrote_it(tiny_assets, tmp_path, monkeypatch, capsys):
    from tests.test_cli import ppap_overrides

    monkeypatch.chdir(tmp_path)
    fit_classifier(tmp_path, 1)
    printed = refused(
        capsys, "test", "ppap.yaml", ppap_overrides(tiny_assets), tmp_path, "--ckpt_path", f"{CHECKPOINTS}/last.ckpt"
    )
    assert (
        "was written by the job plugguide.modules.classifier_pretraining.ClassifierPretraining, not by this run's"
        in printed
    ), printed
    assert "ExpertDistillation" in printed and "<unset>" not in printed and len(printed) < 600, printed
