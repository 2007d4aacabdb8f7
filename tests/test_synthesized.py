"""The synthesized-image cache: reused, fingerprinted, resumable, corruption-proof, the same for any world size."""

from __future__ import annotations

import os

import pytest
import torch

from plugguide.datamodules import SynthesizedImageDataModule


def make(tiny_assets, tmp_path, **overrides) -> SynthesizedImageDataModule:
    settings = dict(diffusion_model=tiny_assets["ddpm-uncond"], num_inference_steps=2, num_images=10, shard_size=4, generation_batch_size=3, batch_size=4, cache_dir=str(tmp_path / "cache"))
    return SynthesizedImageDataModule(**settings | overrides)


def images_of(module: SynthesizedImageDataModule) -> torch.Tensor:
    dataset = module.load()[:]
    assert dataset["index"].tolist() == list(range(module.hparams.num_images))  # no duplicates, no gaps
    return dataset["image"]


def test_second_run_reuses_the_cache(tiny_assets, tmp_path, monkeypatch):
    first = make(tiny_assets, tmp_path)
    first.setup("fit")
    images = first.dataset[:]["image"]
    assert images.shape == (10, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    second = make(tiny_assets, tmp_path)
    monkeypatch.setattr(second, "generate_shard", lambda *a, **k: pytest.fail("a complete cache was regenerated"))
    second.setup("fit")
    torch.testing.assert_close(second.dataset[:]["image"], images)


@pytest.mark.parametrize("change", [dict(seed=1), dict(num_images=11), dict(num_inference_steps=3), dict(scheduler="DDPMScheduler"), dict(image_dtype="uint8")])
def test_any_changed_setting_makes_a_new_cache(tiny_assets, tmp_path, change):
    assert make(tiny_assets, tmp_path).fingerprint() != make(tiny_assets, tmp_path, **change).fingerprint()


def test_interrupted_generation_resumes_from_finished_shards(tiny_assets, tmp_path):
    reference = make(tiny_assets, tmp_path / "reference")
    reference.generate()
    crashing = make(tiny_assets, tmp_path)
    original, written = crashing.generate_shard, []

    def crash_after_one(shard, device, progress):
        if written:
            raise KeyboardInterrupt("injected fault after 1 shard")
        original(shard, device, progress)
        written.append(shard)

    crashing.generate_shard = crash_after_one
    with pytest.raises(KeyboardInterrupt):
        crashing.generate()
    resumed = make(tiny_assets, tmp_path)
    regenerated = []
    original_resumed = resumed.generate_shard
    resumed.generate_shard = lambda shard, device, progress: (regenerated.append(shard), original_resumed(shard, device, progress))
    resumed.generate()
    assert regenerated == [1, 2]  # shard 0 was finished and kept
    torch.testing.assert_close(images_of(resumed), images_of(reference))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_is_detected_and_regenerated(tiny_assets, tmp_path, damage):
    module = make(tiny_assets, tmp_path)
    module.generate()
    expected = images_of(module)
    arrow = next(f for f in os.listdir(module.shard_path(1)) if f.endswith(".arrow"))
    path = os.path.join(module.shard_path(1), arrow)
    if damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "flip":
        with open(path, "r+b") as file:
            file.seek(os.path.getsize(path) // 2)
            byte = file.read(1)
            file.seek(-1, 1)
            file.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.remove(path)
    assert not module.shard_is_complete(1)
    with pytest.raises(RuntimeError, match=r"damaged shards \[1\]"):
        module.load()
    module.generate()
    torch.testing.assert_close(images_of(module), expected)


def test_ranks_generate_disjoint_slices_of_the_same_set(tiny_assets, tmp_path):
    single = make(tiny_assets, tmp_path / "one")
    single.generate()
    split = make(tiny_assets, tmp_path / "two")
    split.generate(rank=0, world_size=2)
    assert [split.shard_is_complete(s) for s in range(3)] == [True, False, True]
    split.generate(rank=1, world_size=2)
    torch.testing.assert_close(images_of(split), images_of(single))


def test_training_batches_are_the_stored_rows_of_every_shard(tiny_assets, tmp_path):
    module = make(tiny_assets, tmp_path, teacher_path=tiny_assets["classifier-resnet"])
    module.setup("fit")
    seen = []
    for batch in module.train_dataloader():
        rows = module.dataset[batch["index"].tolist()]
        for name in ("image", "teacher_logits"):
            assert torch.equal(batch[name], rows[name]), name
        seen += batch["index"].tolist()
    assert len(set(seen)) == len(seen) == 8 and len({i // 4 for i in seen}) >= 2  # rows of several shards


def test_uint8_storage_keeps_every_image_to_8_bits(tiny_assets, tmp_path):
    exact, quantized = make(tiny_assets, tmp_path), make(tiny_assets, tmp_path, image_dtype="uint8")
    for module in (exact, quantized):
        module.setup("fit")
    assert repr(quantized.dataset.features["image"]).count("uint8") == 1  # on disk: one byte per value
    batches = [next(iter(module.train_dataloader())) for module in (exact, quantized)]  # same seeded order
    assert batches[1]["image"].dtype == torch.float32
    assert torch.equal(batches[0]["index"], batches[1]["index"])
    error = (batches[1]["image"] - batches[0]["image"]).abs()
    assert error.max() <= 0.5 / 127.5 + 1e-6 and error.max() > 0


@pytest.mark.parametrize("image_dtype", ["float32", "uint8"])
def test_teacher_logits_are_cached_with_the_images(tiny_assets, tmp_path, image_dtype):
    """The cached logits are the teacher's on exactly the image training reads, also when it is stored as uint8."""
    module = make(tiny_assets, tmp_path, teacher_path=tiny_assets["classifier-resnet"], image_dtype=image_dtype)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["teacher_logits"].shape == (4, 10)
    with torch.no_grad():
        torch.testing.assert_close(batch["teacher_logits"], module.teacher(batch["image"]), atol=1e-5, rtol=1e-4)
