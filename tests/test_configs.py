"""Every YAML under configs/ parses and instantiates (hub configs, which need network, are validated only)."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from plugguide.cli import PlugGuideCLI, main
from plugguide.models import MultiExpertModel, ShiftGuide, load_classifier
from plugguide.models.diffusion_model import load_unet
from plugguide.models.guides import TinyGuide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
)
LOCAL = [c for c in CONFIGS if not c.startswith(os.path.join("configs", "hub"))]
HUB = [c for c in CONFIGS if c.startswith(os.path.join("configs", "hub"))]


def with_base(config: str) -> list[str]:
    """`-c` arguments for a config; a stage overlay (no `model.class_path`) goes on top of its sibling base.yaml."""
    with open(os.path.join(ROOT, config)) as file:
        model = (yaml.safe_load(file) or {}).get("model") or {}
    base = os.path.join(os.path.dirname(config), "base.yaml")
    if "class_path" not in model and os.path.isfile(os.path.join(ROOT, base)):
        return ["-c", base, "-c", config]
    return ["-c", config]


def earlier_job_outputs(config: str, directory) -> list[str]:
    """Overrides pointing a config at what an earlier job of its chain writes; a fresh clone has none of it.

    A CFG halving stage loads its teacher guide from `<guide_root>/tiny/steps-<n>` (the `guides/` export of guide
    distillation's run or of the stage before), a distilled-guidance halving stage from `<guide_root>/shift/steps-<n>`,
    and guidance distillation its teacher experts from the main job's `experts/`: zero-initialised guides and untrained
    experts of the embedded models stand in for them.
    """
    if config.startswith(os.path.join("configs", "halving")):
        unet = load_unet(os.path.join(ROOT, "assets", "digits", "ddpm-cond"))
        for steps in (32, 16, 8):
            TinyGuide(unet).save_pretrained(str(directory / "tiny" / f"steps-{steps}"))
        return [f"--model.init_args.guide_root={directory}"]
    if config.startswith(os.path.join("configs", "guidance_halving")):
        for steps in (32, 16, 8):
            ShiftGuide(16, 1, 10).save_pretrained(str(directory / "shift" / f"steps-{steps}"))
        return [f"--model.init_args.guide_root={directory}"]
    if config == os.path.join("configs", "guidance_distillation.yaml"):
        classifier = load_classifier(os.path.join(ROOT, "assets", "digits", "classifier-resnet"))
        MultiExpertModel(classifier, num_experts=5, lora_rank=8).save_pretrained(str(directory / "experts"))
        return [f"--model.init_args.guidance.init_args.experts={directory / 'experts'}"]
    return []


def test_there_are_configs():
    assert "configs/ppap.yaml" in CONFIGS and "configs/sample.yaml" in CONFIGS and len(LOCAL) >= 7


@pytest.mark.parametrize("config", LOCAL)
def test_local_config_instantiates(config, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    args = [*with_base(config), *earlier_job_outputs(config, tmp_path), "--trainer.logger=false"]
    cli = PlugGuideCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
        save_config_callback=None,
        auto_configure_optimizers=False,
    )
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("config", HUB)
def test_hub_config_validates(config, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *with_base(config), "--print_config"])
    assert exit_info.value.code == 0


EVALUATION_JOBS = ("GuidedSampling", "CalibrationEvaluation")  # predict / test jobs: nothing to resume


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: os.path.relpath(path, "configs"))
def test_every_training_config_keeps_a_last_checkpoint_to_resume_from(config):
    """`--ckpt_path last` resumes any training job: its trainer keeps a `ModelCheckpoint` with `save_last`."""
    with open(config) as file:
        settings = yaml.safe_load(file)
    model = settings.get("model", {}).get("class_path", "")
    if not model or model.endswith(EVALUATION_JOBS):
        pytest.skip("a stage file (its base config holds the trainer) or an evaluation job")
    checkpoints = [
        callback.get("init_args", {})
        for callback in settings.get("trainer", {}).get("callbacks", [])
        if callback["class_path"].endswith("ModelCheckpoint")
    ]
    assert any(init_args.get("save_last") for init_args in checkpoints), config
