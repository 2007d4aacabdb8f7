"""Nothing damaged is ever read back: faults made on purpose, as a new user would (docs/reliability.md)."""

from __future__ import annotations

import errno
import math
import os

import pytest
import torch

from tests.test_cli import refused, run

# ------------------------------------------------------------------------------------------------------
# Checkpoints: whole or absent; a damaged one is named, never loaded.
# ------------------------------------------------------------------------------------------------------
CHECKPOINTS = "runs/pretrain/classifier-resnet/version_0/checkpoints"


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


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing epoch 2's checkpoint: one message naming the file, its size and the folder's free space,
    no partial file under any name; `--ckpt_path last` resumes."""
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
    printed = refused(
        capsys, "fit", "pretrain/classifier_resnet.yaml", classifier_overrides(2), tmp_path, "--ckpt_path", "last"
    )
    monkeypatch.setattr(atomic.torch, "save", real_save)
    assert saves, "the patched save was never reached"
    folder = os.path.abspath(CHECKPOINTS)
    assert "Could not write the checkpoint" in printed and "(No space left on device)" in printed, printed
    assert f"MiB and {folder} has " in printed and "MiB free" in printed and "`trainer.default_root_dir`" in printed
    assert "Traceback" not in printed, printed
    names = sorted(os.listdir(CHECKPOINTS))
    assert names == ["epoch=0-step=2.ckpt", "last.ckpt"], names  # no temporary file left, nothing overwritten
    assert torch.load(f"{CHECKPOINTS}/last.ckpt", weights_only=False)["epoch"] == 0
    fit_classifier(tmp_path, 2, "--ckpt_path", "last")  # disk freed: the run resumes from the whole checkpoint
    assert torch.load(f"{CHECKPOINTS}/last.ckpt", weights_only=False)["global_step"] == 4


def test_the_disk_full_message_gives_the_checkpoints_size_rounded_up():
    from plugguide.atomic_checkpoint import AtomicCheckpointIO, checkpoint_bytes

    weight = torch.zeros(1024, 1024)  # 4 MiB, held twice (a view shares its storage)
    checkpoint = {"state_dict": {"w": weight, "w_t": weight.T}, "optimizer_states": [{"m": torch.zeros(10)}]}
    assert checkpoint_bytes(checkpoint) == 4 * 2**20 + 40
    message = AtomicCheckpointIO.write_error(OSError(errno.ENOSPC, "No space left on device"), "x.ckpt", checkpoint)
    assert "it takes about 4.1 MiB" in message, message


def truncate(path: str, fraction: float = 0.9) -> None:
    os.truncate(
        path, int(os.path.getsize(path) * fraction)
    )  # a copy cut short by a full disk, as Lightning's staging left it


def test_a_truncated_last_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, monkeypatch):
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
    assert "`ckpt_path`='runs/pretrain/classifier-resnet/version_0/checkpoints/last.ckpt' is damaged" in printed, (
        printed
    )
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


def flip(path: str, num_bytes: int = 64) -> None:
    """Inverts `num_bytes` bytes in the middle of the file, its size unchanged (a bad disk block, a bad copy)."""
    middle = os.path.getsize(path) // 2
    with open(path, "r+b") as file:
        file.seek(middle)
        changed = bytes(byte ^ 0xFF for byte in file.read(num_bytes))
        file.seek(middle)
        file.write(changed)


def test_a_last_checkpoint_with_flipped_bytes_is_skipped_for_the_newest_intact_one(tmp_path, monkeypatch):
    """Same size, same zip layout, 64 bytes changed: torch.load reads it without a word; the checksums do not."""
    monkeypatch.chdir(tmp_path)
    fit_classifier(tmp_path, 2)
    size = os.path.getsize(f"{CHECKPOINTS}/last.ckpt")
    flip(f"{CHECKPOINTS}/last.ckpt")
    assert os.path.getsize(f"{CHECKPOINTS}/last.ckpt") == size
    torch.load(f"{CHECKPOINTS}/last.ckpt", weights_only=False)  # what resuming did before: no error
    with pytest.warns(
        UserWarning, match=r"skipping damaged .*last\.ckpt .*changed bytes.*resuming from .*epoch=1-step=4\.ckpt"
    ):
        fit_classifier(tmp_path, 3, "--ckpt_path", "last")
    resumed = torch.load(f"{CHECKPOINTS}/epoch=2-step=6.ckpt", weights_only=False)
    intact = torch.load(f"{CHECKPOINTS}/epoch=1-step=4.ckpt", weights_only=False)
    assert resumed["global_step"] == 6 and intact["global_step"] == 4  # resumed at step 4, from intact weights


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7, 0.95])
def test_checkpoint_damage_finds_flipped_bytes_in_every_entry(tmp_path, where):
    from plugguide.atomic_checkpoint import checkpoint_damage

    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {"weight": torch.randn(64, 64), "bias": torch.randn(64)}, "epoch": 3}, path)
    assert checkpoint_damage(path) is None
    with open(path, "r+b") as file:
        file.seek(int(os.path.getsize(path) * where))
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0x01]))  # one bit
    assert "changed bytes" in checkpoint_damage(path)


def test_a_checkpoint_without_checksums_resumes_with_a_warning_naming_it(tmp_path, monkeypatch):
    """torch's `compute_crc32` off (CRCs of 0): nothing to verify against, so it loads, saying so."""
    from torch.utils.serialization import config

    from plugguide.atomic_checkpoint import AtomicCheckpointIO, checkpoint_damage, checkpoint_without_checksums

    path = str(tmp_path / "old.ckpt")
    with config.patch({"save.compute_crc32": False}):
        torch.save({"state_dict": {"weight": torch.ones(8)}, "epoch": 1}, path)
    assert checkpoint_damage(path) is None and checkpoint_without_checksums(path)
    with pytest.warns(UserWarning, match=r"`ckpt_path`='.*old\.ckpt' holds no CRC-32 checksums"):
        assert AtomicCheckpointIO().load_checkpoint(path)["epoch"] == 1
    with config.patch({"save.compute_crc32": False}):  # the project's own checkpoints carry them regardless
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, str(tmp_path / "new.ckpt"))
    assert not checkpoint_without_checksums(str(tmp_path / "new.ckpt"))


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


# ------------------------------------------------------------------------------------------------------
# Synthesized shards: bound to their set and position; a shard that is not what its manifest says is regenerated.
# ------------------------------------------------------------------------------------------------------
def synthesized(tiny_assets, tmp_path, **overrides):
    from plugguide.datamodules import SynthesizedImageDataModule

    settings = dict(
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_inference_steps=2,
        num_images=8,
        shard_size=4,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
        max_saturated_fraction=None,  # an untrained test UNet synthesizes noise
    )
    return SynthesizedImageDataModule(**settings | overrides)


def garbage_with_an_empty_file_list(module, tiny_assets, tmp_path) -> None:
    import json
    import shutil

    shutil.rmtree(module.shard_path(1))
    os.makedirs(module.shard_path(1))
    with open(os.path.join(module.shard_path(1), "data-00000-of-00001.arrow"), "wb") as file:
        file.write(os.urandom(4096))
    with open(os.path.join(module.shard_path(1), "manifest.json"), "w") as file:
        json.dump({"num_rows": 4, "files": {}}, file)


def copy_of_shard_0(module, tiny_assets, tmp_path) -> None:
    import shutil

    shutil.rmtree(module.shard_path(1))
    shutil.copytree(module.shard_path(0), module.shard_path(1))  # manifest included


def unlisted_file(module, tiny_assets, tmp_path) -> None:
    with open(os.path.join(module.shard_path(1), "data-00001-of-00002.arrow"), "wb") as file:
        file.write(b"not listed")


def listed_file_missing(module, tiny_assets, tmp_path) -> None:
    os.remove(os.path.join(module.shard_path(1), "state.json"))


def shard_of_another_set(module, tiny_assets, tmp_path) -> None:
    import shutil

    other = synthesized(tiny_assets, tmp_path / "other", seed=1)
    other.generate()
    shutil.rmtree(module.shard_path(1))
    shutil.copytree(other.shard_path(1), module.shard_path(1))


@pytest.mark.parametrize(
    "damage",
    [garbage_with_an_empty_file_list, copy_of_shard_0, unlisted_file, listed_file_missing, shard_of_another_set],
)
def test_a_shard_that_is_not_its_manifests_is_regenerated_never_read(tiny_assets, tmp_path, damage):
    module = synthesized(tiny_assets, tmp_path)
    module.generate()
    expected = module.load()[:]
    damage(module, tiny_assets, tmp_path)
    assert not module.shard_is_complete(1)
    with pytest.raises(RuntimeError, match=r"damaged shards \[1\]"):
        module.load()
    module.generate()
    rows = module.load()[:]
    assert rows["index"].tolist() == list(range(8))
    torch.testing.assert_close(rows["image"], expected["image"])


def test_images_outside_the_models_range_are_refused_naming_the_shard(tiny_assets, tmp_path, monkeypatch):
    import plugguide.datamodules.synthesized as synthesized_module

    real_call = synthesized_module.GuidedDiffusionPipeline.__call__

    def blown_up(self, *args, **kwargs):
        output = real_call(self, *args, **kwargs)
        output.images = output.images * 3  # a writer that stored unclipped values: x0 up to 5
        return output

    monkeypatch.setattr(synthesized_module.GuidedDiffusionPipeline, "__call__", blown_up)
    module = synthesized(tiny_assets, tmp_path)
    module.generate()
    with pytest.raises(
        RuntimeError, match=r"Shard .*shard-00000 holds pixel values in \[.*\], outside the model's range \[-1, 1\]"
    ):
        module.load()


def test_the_disk_need_counts_every_byte_written_and_rounds_up(tiny_assets, tmp_path):
    """The estimate a full disk's message gives is at least what the set takes, and not far above it."""
    for settings in (
        dict(),
        dict(teacher_path=tiny_assets["classifier-resnet"]),
        dict(image_dtype="uint8", num_images=40, shard_size=20),
    ):
        module = synthesized(tiny_assets, tmp_path / str(len(os.listdir(tmp_path))), **settings)
        module.generate()
        written = sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(module.cache_path)
            for name in names
        )
        assert written <= module.disk_need() <= 1.5 * written, (settings, written, module.disk_need())


# ------------------------------------------------------------------------------------------------------
# Guidance targets: checked against the guide's prediction, never broadcast over the image.
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide", ["depth", "segmenter"])
@pytest.mark.parametrize("shape", [(4, 1, 16), (4, 1, 1), (4, 8, 8), (4, 16, 1)])
def test_target_maps_of_another_shape_are_refused_naming_the_expected_shape(tiny_assets, guide, shape):
    from plugguide.pipelines import GuidedDiffusionPipeline
    from plugguide.pipelines.guidance import NaiveClassifierGuidance
    from tests.conftest import tiny_scheduler, tiny_unet

    pipeline = GuidedDiffusionPipeline(tiny_unet(), tiny_scheduler(), NaiveClassifierGuidance(tiny_assets[guide]))
    pipeline.set_progress_bar_config(disable=True)
    targets = torch.zeros(shape) if guide == "depth" else torch.zeros(shape, dtype=torch.long)
    with pytest.raises(
        ValueError,
        match=rf"`targets` .*\(4, 16, 16\) \(one map per sample\), but got \({shape[0]}, {shape[1]}, {shape[2]}\)",
    ):
        pipeline(targets=targets, num_inference_steps=1, classifier_scale=1.0, output_type="pt")
    right = torch.zeros(4, 16, 16) if guide == "depth" else torch.zeros(4, 16, 16, dtype=torch.long)
    assert pipeline(targets=right, num_inference_steps=1, classifier_scale=1.0, output_type="pt").images.shape == (
        4,
        1,
        16,
        16,
    )


@pytest.mark.parametrize(
    ("value", "target_range", "message"),
    [
        (
            1e20,
            None,
            r"lie in \[-3\.646e\+17, 3\.646e\+17\] \(beyond \+-3\.65e\+17 the squared error over a 16x16 map ",
        ),
        (
            -5.0,
            (-1.0, 23.0),
            r"lie in \[-1, 23\] \(`target_range`=\[-1\.0, 23\.0\]: the values the regressor predicts\), but got values from -5 to 1",
        ),
        (1e20, (0.0, math.inf), r"lie in \[0, 3\.646e\+17\] \(beyond"),
    ],
    ids=["overflowing", "below-the-range", "open-range-overflowing"],
)
def test_depth_targets_outside_the_range_are_refused_naming_the_value_and_the_range(
    tiny_assets, value, target_range, message
):
    """A 1e20 map used to fail mid-sampling with a FloatingPointError blaming the scale; -5 was taken silently."""
    from plugguide.pipelines import GuidedDiffusionPipeline
    from plugguide.pipelines.guidance import NaiveClassifierGuidance
    from plugguide.pipelines.tasks import DenseRegressionTask
    from tests.conftest import tiny_scheduler, tiny_unet

    task = DenseRegressionTask() if target_range is None else DenseRegressionTask(target_range=target_range)
    guidance = NaiveClassifierGuidance(tiny_assets["depth"], task=task)
    pipeline = GuidedDiffusionPipeline(tiny_unet(), tiny_scheduler(), guidance)
    pipeline.set_progress_bar_config(disable=True)
    targets = torch.ones(2, 16, 16)
    targets[1, 3, 4] = value
    with pytest.raises(ValueError, match=rf"`targets` of dense regression guidance to {message}"):
        pipeline(targets=targets, num_inference_steps=2, classifier_scale=1.0, output_type="pt")
    images = pipeline(targets=torch.ones(2, 16, 16), num_inference_steps=2, classifier_scale=1.0, output_type="pt")
    assert bool(torch.isfinite(images.images).all())


def test_the_depth_jobs_target_range_holds_the_shipped_regressors_maps_of_held_out_digits():
    """configs/ppap_depth.yaml's range takes every map the shipped depth regressor makes of the test digits (what
    `TargetMapDataModule` gives the sampling job), and refuses a negative depth."""
    import yaml

    from plugguide.datamodules import DigitsDataModule
    from plugguide.models import load_dense_model
    from plugguide.pipelines.tasks import DenseRegressionTask

    with open(os.path.join(ROOT, "configs/ppap_depth.yaml")) as file:
        task = yaml.safe_load(file)["model"]["init_args"]["task"]
    task = DenseRegressionTask(**task["init_args"])
    data = DigitsDataModule(batch_size=400)
    data.setup("test")
    model = load_dense_model(os.path.join(ROOT, "assets/digits/depth")).eval().float()
    with torch.no_grad():
        maps = torch.cat([model(batch["image"].float()) for batch in data.test_dataloader()])
    task.check_targets(maps, None)
    with pytest.raises(ValueError, match="target_range"):
        task.check_targets(torch.full_like(maps[:1], -5.0), None)


# ------------------------------------------------------------------------------------------------------
# A synthesized set that looks like noise is refused before training.
# ------------------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shipped_model_sampled_as(tmp_path, prediction_type: str) -> str:
    """A copy of assets/digits/ddpm-uncond whose scheduler config says `prediction_type` (a wrong config's fault)."""
    import json
    import shutil

    copy = str(tmp_path / f"ddpm-uncond-{prediction_type}")
    shutil.copytree(os.path.join(ROOT, "assets/digits/ddpm-uncond"), copy)
    config_path = os.path.join(copy, "scheduler", "scheduler_config.json")
    with open(config_path) as file:
        config = json.load(file)
    with open(config_path, "w") as file:
        json.dump(config | {"prediction_type": prediction_type}, file)
    return copy


def test_a_set_sampled_under_a_wrong_prediction_type_is_refused_before_training(tmp_path):
    from plugguide.datamodules import SynthesizedImageDataModule

    settings = dict(
        num_inference_steps=20, num_images=8, shard_size=8, batch_size=4, cache_dir=str(tmp_path / "cache")
    )
    wrong = SynthesizedImageDataModule(diffusion_model=shipped_model_sampled_as(tmp_path, "sample"), **settings)
    with pytest.raises(
        ValueError,
        match=r"looks like noise.*`data.max_saturated_fraction`=0.4.*`data.diffusion_model`=.*ddpm-uncond-sample.*"
        r"`prediction_type` is 'sample'",
    ):
        wrong.setup("fit")
    right = SynthesizedImageDataModule(diffusion_model=os.path.join(ROOT, "assets/digits/ddpm-uncond"), **settings)
    right.setup("fit")  # the shipped model as trained: images, accepted
    assert len(right.dataset) == 8


def test_an_untrained_models_noise_is_refused_unless_the_check_is_off(tiny_assets, tmp_path):
    with pytest.raises(ValueError, match=r"looks like noise, not images: \d+% of its pixels are saturated"):
        synthesized(tiny_assets, tmp_path, max_saturated_fraction=0.4).setup("fit")
    module = synthesized(tiny_assets, tmp_path)  # max_saturated_fraction=None: the same cached set, read
    module.setup("fit")
    assert len(module.dataset) == 8


# ------------------------------------------------------------------------------------------------------
# Messages name the section and the file.
# ------------------------------------------------------------------------------------------------------
def test_a_missing_model_of_the_data_section_is_named_as_such(tiny_assets, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`data.diffusion_model`='./no/such/model' does not exist"):
        synthesized(tiny_assets, tmp_path, diffusion_model="./no/such/model")


def test_a_guidance_classifier_of_other_channels_is_named_by_its_path(tiny_assets, tmp_path):
    from plugguide.models import TimmClassifier
    from plugguide.modules import GuidedSampling
    from plugguide.pipelines.guidance import NaiveClassifierGuidance
    from tests.conftest import TINY_RESNET

    rgb = str(tmp_path / "classifier-rgb")
    TimmClassifier(**TINY_RESNET | dict(in_chans=3)).save_pretrained(rgb)
    with pytest.raises(ValueError, match=rf"the classifier `guidance`='{rgb}' takes 3 channels"):
        GuidedSampling(
            diffusion_model=tiny_assets["ddpm-uncond"], guidance=NaiveClassifierGuidance(rgb), evaluator_path=None
        )


def test_calibrated_guidance_keeps_the_path_of_the_classifier_it_loaded(tiny_assets):
    from plugguide.pipelines.guidance import CalibratedGuidance, NaiveClassifierGuidance

    path = tiny_assets["classifier-resnet"]
    assert CalibratedGuidance(path).classifier_path == path
    assert CalibratedGuidance(NaiveClassifierGuidance(path)).classifier_path == path  # a wrapped guidance passes it on
