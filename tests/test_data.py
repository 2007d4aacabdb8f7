"""Data modules: shapes, ranges, the fixed digits split, loading any HF image dataset."""

from __future__ import annotations

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from plugguide.datamodules import ClassLabelDataModule, DigitsDataModule, ImageDataModule


def test_digits_split_is_fixed_disjoint_and_complete():
    data = DigitsDataModule()
    data.setup("fit")
    splits = data.load_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 1258, "val": 180, "test": 359}
    arrays = {k: v.with_format("numpy")[:] for k, v in splits.items()}
    rows = {k: {a["image"][i].tobytes() for i in range(len(a["label"]))} for k, a in arrays.items()}
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"] and not rows["val"] & rows["test"]
    again = DigitsDataModule()
    again.setup("fit")
    assert (again.load_splits()["test"].with_format("numpy")[:]["label"] == arrays["test"]["label"]).all()


def test_digits_batches_are_16x16_in_minus_one_one():
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (32, 1, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].std() > 0.3
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= set(range(10))
    assert data.num_classes == 10


def test_image_data_module_reads_save_to_disk_and_image_folders(tmp_path):
    images = [
        PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)) for i in range(20)
    ]
    datasets.Dataset.from_dict(
        {"img": images, "y": [i % 2 for i in range(20)]},
        features=datasets.Features(img=datasets.Image(), y=datasets.Value("int64")),
    ).save_to_disk(str(tmp_path / "saved"))
    for label in (0, 1):
        (tmp_path / "folder" / f"class{label}").mkdir(parents=True)
        for i, image in enumerate(images[:4]):
            image.save(tmp_path / "folder" / f"class{label}" / f"{i}.png")
    for source, columns in (
        (tmp_path / "saved", dict(image_column="img", label_column="y")),
        (tmp_path / "folder", {}),
    ):
        data = ImageDataModule(
            source=str(source),
            image_size=8,
            channels=1,
            batch_size=4,
            val_fraction=0.25,
            test_fraction=0.25,
            **columns,
        )
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        assert batch["image"].shape == (4, 1, 8, 8) and batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert data.num_classes == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(channels=2), "`channels`"),
        (dict(image_size=2), "`image_size`"),
        (dict(val_fraction=1.5), "`val_fraction`"),
    ],
)
def test_image_data_module_rejects_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        ImageDataModule(source="x", **bad)


def test_missing_source_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="`source`"):
        ImageDataModule(source=str(tmp_path / "nowhere/at/all")).load_splits()


def test_class_labels_carry_one_seed_per_sample():
    data = ClassLabelDataModule(num_per_class=3, num_classes=4, batch_size=5, seed=7)
    batches = list(data.predict_dataloader())
    labels = torch.cat([b["label"] for b in batches])
    seeds = torch.cat([b["seed"] for b in batches])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and seeds.tolist() == list(range(7, 19))
