"""The synthesized-image cache: reused, fingerprinted, resumable, corruption-proof, the same for any world size."""

from __future__ import annotations

import os

import pytest
import torch

from plugguide.datamodules import SynthesizedImageDataModule


def make(tiny_assets, tmp_path, **overrides) -> SynthesizedImageDataModule:
    settings = dict(
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_inference_steps=2,
        num_images=10,
        shard_size=4,
        generation_batch_size=3,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
        max_saturated_fraction=None,
    )
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


@pytest.mark.parametrize(
    "change",
    [
        dict(seed=1),
        dict(num_images=11),
        dict(num_inference_steps=3),
        dict(scheduler="DDPMScheduler"),
        dict(image_dtype="uint8"),
    ],
)
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
    resumed.generate_shard = lambda shard, device, progress: (
        regenerated.append(shard),
        original_resumed(shard, device, progress),
    )
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


# ------------------------------------------------------------------------------------------------------
# Crashes and concurrency: runs that share a cache, writers that die, files that did not reach the disk.
# ------------------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process of a concurrent run: says it is ready, waits for the start signal, synthesizes, records the shards it wrote.
WORKER = """
import json, os, sys, time
import torch
torch.set_num_threads(1)
from plugguide.datamodules import SynthesizedImageDataModule
settings, start, record = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
module = SynthesizedImageDataModule(**settings)
original = module.generate_shard
def slow_generate_shard(shard, device, progress):
    original(shard, device, progress)
    time.sleep(0.5)  # long enough that the other process asks for a shard while this one writes
    with open(record, "a") as file:
        file.write(f"{shard}\\n")
module.generate_shard = slow_generate_shard
open(record + ".ready", "w").close()
while not os.path.exists(start):
    time.sleep(0.01)
module.generate()
"""


def test_two_runs_on_one_cache_write_each_shard_once_and_both_finish(tiny_assets, tmp_path):
    import json
    import subprocess
    import sys
    import time

    settings = dict(
        diffusion_model=tiny_assets["ddpm-uncond"],
        num_inference_steps=2,
        num_images=24,
        shard_size=4,
        generation_batch_size=4,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    start = tmp_path / "start"
    env = os.environ | {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(settings), str(start), str(tmp_path / f"written-{n}")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    deadline = time.monotonic() + 120
    while (
        not all((tmp_path / f"written-{n}.ready").exists() for n in range(2))
        and time.monotonic() < deadline
        and all(run.poll() is None for run in runs)
    ):
        time.sleep(0.05)
    start.touch()  # both have imported and built their module: they start together
    outputs = [run.communicate(timeout=240) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-3000:] for _, err in outputs]
    written = [
        [int(line) for line in (tmp_path / f"written-{n}").read_text().split()]
        if (tmp_path / f"written-{n}").exists()
        else []
        for n in range(2)
    ]
    assert sorted(written[0] + written[1]) == list(range(6))  # every shard written once, by one of the two
    assert written[0] and written[1]  # and the two shared the work
    shared = SynthesizedImageDataModule(**settings)
    assert not [name for name in os.listdir(shared.cache_path) if ".tmp-" in name or ".old-" in name]
    single = SynthesizedImageDataModule(**settings | dict(cache_dir=str(tmp_path / "single")))
    single.generate()
    torch.testing.assert_close(images_of(shared), images_of(single))


def test_temporary_shards_of_a_dead_run_are_removed(tiny_assets, tmp_path):
    """A run killed while writing (or out of disk) leaves `shard-*.tmp-*`; the next run that writes that shard removes it."""
    module = make(tiny_assets, tmp_path)
    os.makedirs(module.cache_path)
    for orphan in ("shard-00001.tmp-deadbeef", "shard-00002.old-deadbeef"):
        os.makedirs(os.path.join(module.cache_path, orphan))
        (tmp_path / "cache" / module.fingerprint() / orphan / "data-00000-of-00001.arrow").write_bytes(b"half")
    module.generate()
    assert sorted(
        name for name in os.listdir(module.cache_path) if name.startswith("shard-") and not name.endswith(".lock")
    ) == ["shard-00000", "shard-00001", "shard-00002"]
    assert images_of(module).shape == (10, 1, 16, 16)


def test_a_shard_another_process_writes_is_waited_for_and_its_files_are_left_alone(tiny_assets, tmp_path):
    import threading
    import time

    from filelock import FileLock

    module = make(tiny_assets, tmp_path)
    os.makedirs(module.cache_path)
    live = os.path.join(module.cache_path, "shard-00001.tmp-live0000")
    os.makedirs(live)
    writer = FileLock(os.path.join(module.cache_path, "shard-00001.lock"))  # the other, live writer of shard 1
    writer.acquire()
    run = threading.Thread(target=module.generate)
    run.start()
    deadline = time.monotonic() + 60
    while not (module.shard_is_complete(0) and module.shard_is_complete(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert module.shard_is_complete(0) and module.shard_is_complete(2)  # the free shards are written meanwhile
    time.sleep(0.3)
    assert (
        run.is_alive() and os.path.isdir(live) and not module.shard_is_complete(1)
    )  # waiting; the writer's files untouched
    writer.release()  # the writer died without finishing: this run writes shard 1 itself
    run.join(timeout=60)
    assert not run.is_alive() and module.shard_is_complete(1) and not os.path.exists(live)


@pytest.mark.parametrize("manifest", ["", "{", "[]", '{"files": 3, "num_rows": 4}', '{"num_rows": 4}'])
def test_an_empty_or_garbled_manifest_means_the_shard_is_written_again(tiny_assets, tmp_path, manifest):
    module = make(tiny_assets, tmp_path)
    module.generate()
    expected = images_of(module)
    with open(os.path.join(module.shard_path(1), "manifest.json"), "w") as file:
        file.write(manifest)
    assert not module.shard_is_complete(1)
    module.generate()
    assert module.shard_is_complete(1)
    torch.testing.assert_close(images_of(module), expected)


def test_shard_files_reach_the_disk_before_the_shard_is_renamed_into_place(tiny_assets, tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1]
    )
    monkeypatch.setattr(
        os, "rename", lambda src, dst: (events.append(("rename", str(src), str(dst))), real_rename(src, dst))[1]
    )
    module = make(tiny_assets, tmp_path)
    module.generate()
    renames = [
        i for i, event in enumerate(events) if event[0] == "rename" and os.path.basename(event[2]).startswith("shard-")
    ]
    assert len(renames) == 3
    for i in renames:
        source = events[i][1]
        synced = {event[1] for event in events[:i] if event[0] == "fsync"}
        files = {os.path.join(source, name) for name in os.listdir(events[i][2])}
        assert files and files | {source} <= synced  # every file, and the directory, flushed before the rename
        assert ("fsync", os.path.realpath(module.cache_path)) in events[i + 1 :]  # and the rename itself after it


def test_a_full_disk_names_cache_dir_and_leaves_no_partial_shard(tiny_assets, tmp_path, monkeypatch):
    import errno

    import datasets

    module = make(tiny_assets, tmp_path)
    real_save = datasets.Dataset.save_to_disk

    def save_until_full(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)  # the files are (partly) there when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_until_full)
    with pytest.raises(OSError, match=r"`data\.cache_dir`=.*No space left on device.*free space") as info:
        module.generate()
    assert info.value.errno == errno.ENOSPC
    assert not [name for name in os.listdir(module.cache_path) if ".tmp-" in name]
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    module.generate()  # after freeing space, the same run resumes
    assert images_of(module).shape == (10, 1, 16, 16)
