"""The `lightning` command runs the real configs end to end, on tiny models in a temporary directory."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from plugguide.cli import main

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def run(command: str, configs: str | list[str], overrides: dict, tmp_path, *extra: str) -> None:
    """`lightning <command> -c configs/<config> [-c ...] -c overrides.yaml`, run in `tmp_path`."""
    override_file = tmp_path / f"overrides-{command}.yaml"
    override_file.write_text(yaml.safe_dump(overrides))
    layers = [
        arg
        for config in ([configs] if isinstance(configs, str) else configs)
        for arg in ("-c", os.path.join(CONFIGS, config))
    ]
    main([command, *layers, "-c", str(override_file), *extra])


def sampling_overrides(
    tmp_path, model: dict, data: dict, *, data_class: str | None = None, precision: str | None = None, **writer_args
) -> dict:
    """Overrides of a sampling job (`predict`) run in `tmp_path`: no progress bar, `SampleWriter` writing to
    tmp_path/out (with `writer_args`), `model` and `data` as the model's and the data's init_args, the data module's
    `data_class` and the trainer's `precision` where given."""
    writer = {"class_path": "plugguide.callbacks.SampleWriter", "init_args": {"output_dir": str(tmp_path / "out")}}
    writer["init_args"] |= writer_args
    trainer = {"enable_progress_bar": False, "callbacks": [writer]}
    if precision is not None:
        trainer["precision"] = precision
    data_section = {"init_args": data} if data_class is None else {"class_path": data_class, "init_args": data}
    return {"trainer": trainer, "model": {"init_args": model}, "data": data_section}


def refused(capsys, command: str, configs: str | list[str], overrides: dict, tmp_path, *extra: str) -> str:
    """Runs a command the project must refuse; returns what it printed: the project's message, plainly, exit status 1."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(command, configs, overrides, tmp_path, *extra)
    assert exit_info.value.code == 1
    return capsys.readouterr().err


def ppap_overrides(assets: dict) -> dict:
    return {
        "trainer": {
            "max_steps": 6,
            "check_val_every_n_epoch": 1,
            "limit_val_batches": 1,
            "limit_test_batches": 1,
            "enable_progress_bar": False,
        },
        "model": {
            "init_args": {
                "teacher_path": assets["classifier-resnet"],
                "diffusion_model": assets["ddpm-uncond"],
                "evaluator_path": assets["evaluator"],
                "autoencoder_path": assets["autoencoder"],
                "num_inference_steps": 2,
                "lora_rank": 4,
            }
        },
        "data": {
            "init_args": {
                "num_images": 20,
                "num_inference_steps": 3,
                "batch_size": 4,
                "shard_size": 10,
                "max_saturated_fraction": None,
                "labelled_data": {
                    "class_path": "plugguide.datamodules.DigitsDataModule",
                    "init_args": {"batch_size": 8},
                },
            }
        },
    }


def test_ppap_fit_then_test(tiny_assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overrides = ppap_overrides(tiny_assets)
    run("fit", "ppap.yaml", overrides, tmp_path)
    assert os.path.isfile(tmp_path / "runs/ppap/version_0/experts/experts.json")
    events = list((tmp_path / "runs/ppap/version_0").glob("events.out.tfevents*"))
    assert events, "no TensorBoard log"
    assert (tmp_path / "runs/ppap/version_0/checkpoints/last.ckpt").is_file()
    # The README's command: a new process finds the trained experts with --ckpt_path last, and needs it.
    assert "no checkpoint was loaded" in refused(capsys, "test", "ppap.yaml", overrides, tmp_path)
    run("test", "ppap.yaml", overrides, tmp_path, "--ckpt_path", "last")
    # The test wrote beside the fit it scored, and kept the fit's config.
    fit_config = yaml.safe_load((tmp_path / "runs/ppap/version_0/config.yaml").read_text())
    test_config = yaml.safe_load((tmp_path / "runs/ppap/version_0/config-test.yaml").read_text())
    assert fit_config["ckpt_path"] is None and test_config["ckpt_path"] == "last"


def test_sample_job_writes_npz_and_grid(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = {
        "diffusion_model": tiny_assets["ddpm-cond"],
        "num_inference_steps": 2,
        "guidance_scale": 4.0,
        "evaluator_path": tiny_assets["evaluator"],
    }
    overrides = sampling_overrides(tmp_path, model, {"num_per_class": 2, "batch_size": 7}, nrow=2)
    run("predict", "sample.yaml", overrides, tmp_path)
    samples = np.load(tmp_path / "out/samples.npz")
    assert samples["images"].shape == (20, 1, 16, 16) and samples["images"].dtype == np.float32
    assert samples["images"].min() >= -1 and samples["images"].max() <= 1
    assert samples["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert (tmp_path / "out/grid.png").is_file()


def test_help_and_print_config_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", os.path.join(CONFIGS, "ppap.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "ExpertDistillation" in capsys.readouterr().out


def test_sample_job_with_a_distilled_guide(tiny_assets, tmp_path, monkeypatch):
    from plugguide.models import TinyGuide
    from plugguide.models.diffusion_model import load_unet

    monkeypatch.chdir(tmp_path)
    TinyGuide(load_unet(tiny_assets["ddpm-cond"]), hidden_dim=8).save_pretrained(str(tmp_path / "guide"))
    model = {
        "diffusion_model": tiny_assets["ddpm-cond"],
        "guide_path": str(tmp_path / "guide"),
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "evaluator_path": tiny_assets["evaluator"],
    }
    overrides = sampling_overrides(tmp_path, model, {"num_per_class": 1, "batch_size": 10})
    run("predict", "sample.yaml", overrides, tmp_path)
    assert np.load(tmp_path / "out/samples.npz")["images"].shape == (10, 1, 16, 16)


@pytest.mark.parametrize(
    "config", ["ddpm_uncond", "ddpm_cond", "flow_uncond", "classifier_resnet", "classifier_deit", "evaluator"]
)
def test_pretraining_configs_fast_dev_run(config, tmp_path, monkeypatch):
    """Each pretraining job runs one batch end to end and exports its model under its run folder, not over the shipped asset."""
    monkeypatch.chdir(tmp_path)
    overrides = {"trainer": {"fast_dev_run": True, "enable_progress_bar": False}}
    if config.startswith(("ddpm", "flow")):  # keep the grid small
        with open(os.path.join(CONFIGS, "pretrain", f"{config}.yaml")) as file:
            callbacks = yaml.safe_load(file)["trainer"]["callbacks"]
        (grid,) = [callback for callback in callbacks if callback["class_path"].endswith("GuidedSampleGrid")]
        grid["init_args"].update(num_per_class=1, num_inference_steps=2)
        overrides["trainer"]["callbacks"] = callbacks
    run("fit", f"pretrain/{config}.yaml", overrides, tmp_path)
    exported = tmp_path / "runs" / "pretrain" / config.replace("_", "-") / "version_0" / "model"
    assert (exported / "model_index.json").is_file() or (exported / "model.safetensors").is_file()
    assert not (tmp_path / "assets").exists()


def test_a_settings_error_is_printed_plainly_with_the_traceback_on_request(tiny_assets, tmp_path, monkeypatch, capsys):
    """A constructor's error used to end ~70 lines of jsonargparse traceback with a Namespace dump."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PLUGGUIDE_TRACEBACK", raising=False)
    overrides = {
        "model": {
            "init_args": {"diffusion_model": tiny_assets["ddpm-uncond"], "evaluator_path": tiny_assets["evaluator"]}
        }
    }
    printed = refused(capsys, "predict", "sample.yaml", overrides, tmp_path, "--data.batch_size", "0")
    assert "ValueError: Expected `batch_size` to be >= 1, but got 0." in printed
    assert "Traceback" not in printed and "Namespace(" not in printed and len(printed.strip().splitlines()) <= 3, (
        printed
    )
    monkeypatch.setenv("PLUGGUIDE_TRACEBACK", "1")
    with pytest.raises(ValueError) as info:  # jsonargparse's error, with the project's as its cause
        run("predict", "sample.yaml", overrides, tmp_path, "--data.batch_size", "0")
    assert "Expected `batch_size` to be >= 1" in str(info.value.__cause__ or info.value)


@pytest.fixture(scope="module")
def trained_experts(tiny_assets, tmp_path_factory) -> tuple:
    """A tiny PPAP fit (5 experts, LoRA rank 4, guidance scale 10), shared by the tests; returns its directory and overrides."""
    directory = tmp_path_factory.mktemp("trained")
    overrides = ppap_overrides(tiny_assets)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        run("fit", "ppap.yaml", overrides, directory)
    return directory, overrides


def test_the_command_line_wins_over_the_checkpoints_settings(trained_experts, monkeypatch, caplog):
    """`--ckpt_path <file>` used to replace the run's model settings with the checkpoint's: a test at scale 0 ran at 10 (case 7)."""
    from plugguide.modules import ExpertDistillation

    directory, overrides = trained_experts
    monkeypatch.chdir(directory)
    used = []
    monkeypatch.setattr(ExpertDistillation, "on_test_start", lambda self: used.append(self.hparams.classifier_scale))
    monkeypatch.setattr(ExpertDistillation, "test_step", lambda self, batch, batch_idx: None)
    monkeypatch.setattr(ExpertDistillation, "on_test_epoch_end", lambda self: None)
    for scale in ("0", "3.5"):
        run(
            "test",
            "ppap.yaml",
            overrides,
            directory,
            "--ckpt_path",
            "runs/ppap/version_0/checkpoints/last.ckpt",
            "--model.classifier_scale",
            scale,
        )
    assert used == [0.0, 3.5]
    assert (
        "saved with model settings classifier_scale=4.0; this run uses classifier_scale=3.5 (the checkpoint gives the weights only)"
        in caplog.text
    )


@pytest.mark.parametrize("ckpt_path", ["runs/ppap/version_0/checkpoints/last.ckpt", "last"])
@pytest.mark.parametrize(("setting", "value"), [("num_experts", "3"), ("lora_rank", "2")])
def test_a_checkpoint_whose_weights_do_not_fit_the_settings_is_refused_naming_them(
    trained_experts, monkeypatch, capsys, ckpt_path, setting, value
):
    directory, overrides = trained_experts
    monkeypatch.chdir(directory)
    printed = refused(
        capsys, "test", "ppap.yaml", overrides, directory, "--ckpt_path", ckpt_path, f"--model.{setting}", value
    )
    saved = {"num_experts": 5, "lora_rank": 4}[setting]
    assert f"saved with {setting}={saved}, which do not fit this run's {setting}={value}" in printed, printed


def test_the_plugguide_command_is_the_lightning_command():
    from importlib.metadata import entry_points

    scripts = {
        entry.name: entry.value
        for entry in entry_points(group="console_scripts")
        if entry.name in ("plugguide", "lightning")
    }
    assert scripts == {"plugguide": "plugguide.cli:main", "lightning": "plugguide.cli:main"}
