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
    layers = [arg for config in ([configs] if isinstance(configs, str) else configs) for arg in ("-c", os.path.join(CONFIGS, config))]
    main([command, *layers, "-c", str(override_file), *extra])


def ppap_overrides(assets: dict) -> dict:
    return {
        "trainer": {"max_steps": 6, "check_val_every_n_epoch": 1, "limit_val_batches": 1, "limit_test_batches": 1, "enable_progress_bar": False},
        "model": {"init_args": {"teacher_path": assets["classifier-resnet"], "diffusion_model": assets["ddpm-uncond"], "evaluator_path": assets["evaluator"], "num_inference_steps": 2, "lora_rank": 4}},
        "data": {"init_args": {"diffusion_model": assets["ddpm-uncond"], "teacher_path": assets["classifier-resnet"], "num_images": 20, "num_inference_steps": 3, "batch_size": 4, "shard_size": 10, "labelled_data": {"class_path": "plugguide.datamodules.DigitsDataModule", "init_args": {"batch_size": 8}}}},
    }


def test_ppap_fit_then_test(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = ppap_overrides(tiny_assets)
    run("fit", "ppap.yaml", overrides, tmp_path)
    assert os.path.isfile(tmp_path / "runs/ppap/experts/experts.json")
    events = list((tmp_path / "runs/ppap").rglob("events.out.tfevents*"))
    assert events, "no TensorBoard log"
    assert (tmp_path / "runs/ppap/checkpoints/last.ckpt").is_file()
    # The README's command: a new process (new logger version) still finds the trained experts.
    with pytest.raises(ValueError, match="no checkpoint was loaded"):
        run("test", "ppap.yaml", overrides, tmp_path)
    run("test", "ppap.yaml", overrides, tmp_path, "--ckpt_path", "last")


def test_sample_job_writes_npz_and_grid(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = {
        "trainer": {"enable_progress_bar": False, "callbacks": [{"class_path": "plugguide.callbacks.SampleWriter", "init_args": {"output_dir": str(tmp_path / "out"), "nrow": 2}}]},
        "model": {"init_args": {"diffusion_model": tiny_assets["ddpm-cond"], "num_inference_steps": 2, "cfg_scale": 3.0, "evaluator_path": tiny_assets["evaluator"]}},
        "data": {"init_args": {"num_per_class": 2, "batch_size": 7}},
    }
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
    overrides = {
        "trainer": {"enable_progress_bar": False, "callbacks": [{"class_path": "plugguide.callbacks.SampleWriter", "init_args": {"output_dir": str(tmp_path / "out")}}]},
        "model": {"init_args": {"diffusion_model": tiny_assets["ddpm-cond"], "guide_path": str(tmp_path / "guide"), "num_inference_steps": 2, "cfg_scale": 4.0, "evaluator_path": tiny_assets["evaluator"]}},
        "data": {"init_args": {"num_per_class": 1, "batch_size": 10}},
    }
    run("predict", "sample.yaml", overrides, tmp_path)
    assert np.load(tmp_path / "out/samples.npz")["images"].shape == (10, 1, 16, 16)


def test_experts_refuse_logits_cached_for_another_teacher(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = ppap_overrides(tiny_assets)
    overrides["model"]["init_args"]["teacher_path"] = tiny_assets["classifier-deit"]  # the data still caches the ResNet's logits
    with pytest.raises(ValueError, match="`data.teacher_path`=.*`model.teacher_path`="):
        run("fit", "ppap.yaml", overrides, tmp_path)


@pytest.mark.parametrize("config", ["ddpm_uncond", "ddpm_cond", "flow_uncond", "classifier_resnet", "classifier_deit", "evaluator"])
def test_pretraining_configs_fast_dev_run(config, tmp_path, monkeypatch):
    """Each pretraining job runs one batch end to end and exports its model, relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    overrides = {"trainer": {"fast_dev_run": True, "enable_progress_bar": False}}
    if config.startswith(("ddpm", "flow")):  # keep the grid small
        with open(os.path.join(CONFIGS, "pretrain", f"{config}.yaml")) as file:
            callbacks = yaml.safe_load(file)["trainer"]["callbacks"]
        (grid,) = [callback for callback in callbacks if callback["class_path"].endswith("GuidedSampleGrid")]
        grid["init_args"].update(num_per_class=1, num_inference_steps=2)
        overrides["trainer"]["callbacks"] = callbacks
    run("fit", f"pretrain/{config}.yaml", overrides, tmp_path)
    exported = tmp_path / "assets" / "digits" / config.replace("_", "-")
    assert (exported / "model_index.json").is_file() or (exported / "model.safetensors").is_file()
