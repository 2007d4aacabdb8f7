"""Each run writes under `<default_root_dir>/version_N/`; `--ckpt_path last` resumes into that version; settings once.

Also the CLI's public hooks, the run's TensorBoard hyper-parameters and the denoising progress bar.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel

from plugguide.cli import PlugGuideCLI, main
from plugguide.pipelines.finite import check_scale
from plugguide.project_error import raised_by_project, raised_by_statement
from tests.test_cli import CONFIGS, ppap_overrides, refused, run


class Crash(Exception):
    pass


class CrashAfter(L.Callback):
    """Raises once `steps` optimizer steps are done and checkpointed, like a killed job."""

    def __init__(self, steps: int = 3) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.steps:
            raise Crash(f"injected crash before step {self.steps + 1}")


def small_fit(assets: dict, root, *callbacks: dict) -> dict:
    """The main job, shrunk: 6 steps, a checkpoint every step, its experts exported, no grids; written under `root`."""
    overrides = ppap_overrides(assets)
    overrides["trainer"] |= {
        "default_root_dir": str(root),
        "limit_val_batches": 0,
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "every_n_train_steps": 1},
            },
            {"class_path": "plugguide.callbacks.ExportPretrained", "init_args": {"directory": "experts"}},
            *callbacks,
        ],
    }
    overrides["data"]["init_args"]["cache_dir"] = str(root.parent / "cache")
    return overrides


def step_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_a_run_writes_everything_under_its_version_folder_and_two_runs_get_two(tiny_assets, tmp_path, monkeypatch):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    root = tmp_path / "my-run"
    overrides = small_fit(tiny_assets, root)
    run("fit", "ppap.yaml", overrides, tmp_path)
    run("fit", "ppap.yaml", overrides, tmp_path)
    assert sorted(os.listdir(root)) == ["latest", "version_0", "version_1"]
    assert os.readlink(root / "latest") == "version_1"  # the run that exported last, for the next job of a chain
    for version in ("version_0", "version_1"):
        folder = root / version
        assert (folder / "checkpoints" / "last.ckpt").is_file() and step_of(folder / "checkpoints" / "last.ckpt") == 6
        assert (folder / "experts" / "experts.json").is_file()
        assert (folder / "config.yaml").is_file() and list(folder.glob("events.out.tfevents*"))
        assert not list((folder / "checkpoints").glob("last-v*.ckpt"))
    assert os.listdir(workdir) == [], "a run wrote outside its folder"


def test_resume_after_a_crash_continues_in_the_same_version_and_a_plain_rerun_starts_a_new_one(
    tiny_assets, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs" / "ppap"
    with pytest.raises(Crash):
        run(
            "fit",
            "ppap.yaml",
            small_fit(
                tiny_assets, root, {"class_path": "tests.test_run_folder.CrashAfter", "init_args": {"steps": 3}}
            ),
            tmp_path,
        )
    last = root / "version_0" / "checkpoints" / "last.ckpt"
    assert step_of(last) == 3

    caplog.clear()
    run("fit", "ppap.yaml", small_fit(tiny_assets, root), tmp_path, "--ckpt_path", "last")
    assert sorted(os.listdir(root)) == ["latest", "version_0"], "the resumed run wrote a new version"
    assert step_of(last) == 6 and not list(last.parent.glob("last-v*.ckpt"))
    assert (root / "version_0" / "experts" / "experts.json").is_file()
    assert f"Run folder {root / 'version_0'}: fit from {last}." in caplog.text

    caplog.clear()
    run("fit", "ppap.yaml", small_fit(tiny_assets, root), tmp_path)
    assert (
        sorted(os.listdir(root)) == ["latest", "version_0", "version_1"]
        and step_of(root / "version_1" / "checkpoints" / "last.ckpt") == 6
    )
    assert f"Run folder {root / 'version_1'}: a new fit run, from step 0" in caplog.text


def test_too_few_steps_for_the_chained_experts_is_refused_before_any_synthesis(
    tiny_assets, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    overrides = small_fit(tiny_assets, tmp_path / "runs")
    printed = refused(capsys, "fit", "ppap.yaml", overrides, tmp_path, "--trainer.max_steps", "1")
    assert "`trainer.max_steps`" in printed and "`model.num_experts`=5" in printed and "but got 1" in printed, printed
    assert not (tmp_path / "cache").exists(), "images were synthesized before the refusal"


def test_the_data_takes_the_models_diffusion_model_and_teacher(tiny_assets, tmp_path, monkeypatch):
    """Set once under `model:`; a classifier teacher's logits are cached, a dense teacher's are not."""
    monkeypatch.chdir(tmp_path)

    def built(config: str, overrides: dict) -> PlugGuideCLI:
        (tmp_path / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        args = ["-c", os.path.join(CONFIGS, config), "-c", str(tmp_path / "overrides.yaml"), "--trainer.logger=false"]
        return PlugGuideCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=args,
            save_config_callback=None,
            auto_configure_optimizers=False,
        )

    overrides = small_fit(tiny_assets, tmp_path / "runs")
    overrides["model"]["init_args"]["teacher_path"] = tiny_assets["classifier-deit"]
    data = built("ppap.yaml", overrides).datamodule.hparams
    assert data.diffusion_model == tiny_assets["ddpm-uncond"] and data.teacher_path == tiny_assets["classifier-deit"]
    overrides["model"]["init_args"] |= {"teacher_path": tiny_assets["segmenter"], "evaluator_path": None}
    data = built("ppap_segmentation.yaml", overrides).datamodule.hparams
    assert data.diffusion_model == tiny_assets["ddpm-uncond"] and data.teacher_path is None


def test_an_optimizer_outside_the_model_is_refused(capsys):
    """The jobs take their optimiser under `model:` (the chain schedule copies its state between experts)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", os.path.join(CONFIGS, "ppap.yaml"), "--optimizer", "torch.optim.SGD", "--print_config"])
    assert exit_info.value.code != 0 and "optimizer" in capsys.readouterr().err


def test_hparams_hold_the_runs_settings_and_no_placeholder_metric(tiny_assets, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    overrides = small_fit(tiny_assets, tmp_path / "runs")
    overrides["trainer"]["log_every_n_steps"] = 1
    overrides["trainer"]["callbacks"].append(
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}}
    )
    run("fit", "ppap.yaml", overrides, tmp_path)
    hparams = yaml.safe_load((tmp_path / "runs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["model.optimizer.lr"] == 0.001 and hparams["model.classifier_scale"] == 4.0
    assert hparams["data.num_images"] == 20 and hparams["data.teacher_path"] == tiny_assets["classifier-resnet"]
    events = EventAccumulator(str(tmp_path / "runs" / "version_0")).Reload()
    assert "lr-AdamW" in events.Tags()["scalars"] and "hp_metric" not in events.Tags()["scalars"]


def test_lightning_parses_the_checkpoint_path_right_after_parse_arguments(monkeypatch):
    """`PlugGuideCLI.parse_arguments` hides `--ckpt_path` from LightningCLI's `_parse_ckpt_path`, which would parse the
    checkpoint's hyper-parameters over the run's settings. This fails when Lightning renames that method or calls it
    elsewhere than between `parse_arguments` and `before_instantiate_classes`."""
    calls = []

    class Probe(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            calls.append("parse_arguments")

        def before_instantiate_classes(self) -> None:
            calls.append("before_instantiate_classes")
            raise Crash

    monkeypatch.setattr(
        LightningCLI,
        "_parse_ckpt_path",
        lambda self: calls.append(("_parse_ckpt_path", self.config[self.config.subcommand].ckpt_path)),
    )
    with pytest.raises(Crash):
        Probe(BoringModel, args=["fit", "--ckpt_path", "some.ckpt"])
    assert calls == ["parse_arguments", ("_parse_ckpt_path", "some.ckpt"), "before_instantiate_classes"]


def test_only_a_raise_statement_of_the_project_counts_as_its_own_error():
    with pytest.raises(ValueError) as deliberate:
        check_scale("guidance_scale", -1.0)
    assert raised_by_project(deliberate.value)

    def bug():
        return int("four")

    with pytest.raises(ValueError) as accidental:
        bug()
    assert not raised_by_statement(accidental.value)
    assert not raised_by_project(accidental.value)  # and not a plugguide module either


def test_predict_shows_a_bar_over_each_batchs_denoising_steps(tiny_assets, tmp_path, monkeypatch, capsys):
    """`predict` of one batch used to read `0/1`, then `1/1`, for the whole DDPM-50 run."""
    monkeypatch.chdir(tmp_path)
    overrides = {
        "trainer": {"default_root_dir": str(tmp_path / "runs")},
        "model": {
            "init_args": {
                "diffusion_model": tiny_assets["ddpm-uncond"],
                "num_inference_steps": 3,
                "evaluator_path": None,
            }
        },
        "data": {"init_args": {"num_per_class": 1, "batch_size": 10}},
    }
    run("predict", "sample.yaml", overrides, tmp_path)
    printed = capsys.readouterr().err
    assert "Denoising:" in printed and "0/3 [" in printed, printed  # a bar of 3 denoising steps (cleared when done)


def test_the_run_folder_of_each_checkpoint_path(tmp_path):
    """Unit: which version a command writes into and which checkpoint it loads, from `--ckpt_path`."""
    from plugguide.run_folder import RunFolder, resolve_run_folder

    root = tmp_path / "runs"
    assert resolve_run_folder(str(root), "last") == RunFolder(str(root))  # nothing yet: a new run, no checkpoint
    for version in (0, 1, 2):
        (root / f"version_{version}" / "checkpoints").mkdir(parents=True)
    best = root / "version_1" / "checkpoints" / "epoch=3-step=40.ckpt"
    best.write_bytes(b"")
    last = root / "version_1" / "checkpoints" / "last.ckpt"
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/acc'}": {"best_model_path": str(best)}}}, last)
    # version_2 holds no last.ckpt (a test run, or a crash before the first checkpoint): version_1 is resumed.
    assert resolve_run_folder(str(root), "last") == RunFolder(str(root), 1, str(last))
    assert resolve_run_folder(str(root), "best") == RunFolder(str(root), 1, str(best))
    assert resolve_run_folder(str(root), None) == RunFolder(str(root))
    assert resolve_run_folder(str(root), str(best)) == RunFolder(str(root), 1, str(best))
    elsewhere = tmp_path / "other.ckpt"
    elsewhere.write_bytes(b"")
    assert resolve_run_folder(str(root), str(elsewhere)) == RunFolder(str(root), None, str(elsewhere))
