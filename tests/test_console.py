"""What a user running the README's commands sees, and what it says about their run."""

from __future__ import annotations

import warnings

import torch

from tests.test_cli import ppap_overrides, run

# What the main job printed before, none of it about the user's run.
NOISE = (
    "`lora_bias=True`",
    "module(s) in eval mode at the start of training",
    "InceptionScore",
    "degrees of freedom",
    "💡 Tip",
    "LeafSpec",
)


def test_main_job_console_is_quiet_and_counts_steps(tiny_assets, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    overrides = ppap_overrides(tiny_assets)
    overrides["trainer"]["enable_progress_bar"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run("fit", "ppap.yaml", overrides, tmp_path)
        run("test", "ppap.yaml", overrides, tmp_path, "--ckpt_path", "last")
    console = capsys.readouterr()
    logged = caplog.text  # what Lightning's logger prints to the terminal outside pytest
    said = [str(w.message) for w in caught] + [console.out, console.err, logged]
    for noise in NOISE:
        assert not any(noise in line for line in said), noise
    assert "Frozen, in eval mode" in logged and "teacher (TimmClassifier" in logged
    assert "6/6" in console.out and "steps" in console.out and "/-2" not in console.out  # one bar over max_steps
    assert "Mode" in logged and "FLOPs" not in logged  # the summary, without a column nothing measured


def test_experts_train_with_batch_statistics_and_checkpoints_hold_no_frozen_network(
    tiny_assets, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    run("fit", "ppap.yaml", ppap_overrides(tiny_assets), tmp_path)
    state = torch.load(tmp_path / "runs/ppap/version_0/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert not any(key.startswith(("teacher.", "unet.", "metrics.")) for key in state)
    expert_means = [
        v for k, v in state.items() if k.endswith("bn1.modules_to_save.expert_0.running_mean") and "layer" not in k
    ]
    original = [v for k, v in state.items() if k.endswith("bn1.original_module.running_mean") and "layer" not in k]
    # The per-expert BatchNorm statistics moved in training (train mode); the backbone's own stayed.
    assert len(expert_means) == len(original) == 1 and not torch.allclose(expert_means[0], original[0])
