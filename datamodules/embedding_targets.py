"""Target embeddings for embedding-similarity guidance: a prompt's (CLIP) or a held-out reference image's."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from plugguide.datamodules.digits import DigitsDataModule
from plugguide.datamodules.image_folder import ImageDataModule
from plugguide.models import embed_images, load_off_the_shelf

# Splits a reference image may come from: the validation split only, since the test split is the metrics' reference
# (a sample guided toward a test image would be scored against the very set it was pulled toward).
REFERENCE_SPLITS = ("val",)


def reference_images(labelled_data: ImageDataModule, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (K, C, H, W) in [-1, 1], classes (K,)): the first image of each class in `split`, by class, one per
    class that the split holds; the reference digits that embedding guidance on the digits pulls toward."""
    if split not in REFERENCE_SPLITS:
        raise ValueError(
            f"Expected the reference `split` to be one of {list(REFERENCE_SPLITS)}, but got {split!r}: the test split is "
            "the metrics' reference and the train split the models' training data."
        )
    images, labels = labelled_data.split_images(split)
    classes = labels.unique(sorted=True)
    first = torch.stack([(labels == label).nonzero()[0, 0] for label in classes])
    return images[first], classes


class _EmbeddingTargetsDataset(Dataset):
    def __init__(self, rows: dict[str, torch.Tensor], seed: int) -> None:
        self.rows = rows
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows["target_embedding"])

    def __getitem__(self, index: int) -> dict:
        return {name: values[index] for name, values in self.rows.items()} | {
            "label": -1,
            "seed": self.seed + index,
            "index": index,
        }


class EmbeddingTargetDataModule(L.LightningDataModule):
    """`num_per_target` samples toward each target embedding: a prompt's text embedding, or a reference image's.

    With `prompts` (a CLIP model), each prompt's text embedding is a target (TFG's and EluCD's text guidance); without,
    the first image of each class in the validation split of `labelled_data` is a reference (`reference_images`) and its
    embedding by the model the target, so the independent evaluator can score each sample against the reference's class
    (`target_class`), as accuracy toward the reference digit. Batches:
    `{"target_embedding": (B, D), "target_class": (B,), "label": -1, "seed", "index"}`, sample i seeded with
    `seed + i`, targets in order, `num_per_target` samples each; a prompt names no class (`target_class` -1).

    Args:
        model_path (`str`, defaults to `"assets/digits/embedder"`): the embedder (any `load_off_the_shelf` path: a
            saved `ImageEmbedder`, a CLIP folder or hub id); the guide's own model, so its targets are in its space.
        prompts (`list[str]`, *optional*): text targets (a CLIP model with its tokenizer); None: reference images.
        labelled_data (`ImageDataModule`, *optional*): the real images of the references (default: the digits).
        num_per_target (`int`, defaults to 8): samples per target.
        batch_size (`int`, defaults to 80): samples per batch.
        seed (`int`, defaults to 0): seed of sample 0.
    """

    def __init__(
        self,
        model_path: str = "assets/digits/embedder",
        prompts: list[str] | None = None,
        labelled_data: ImageDataModule | None = None,
        num_per_target: int = 8,
        batch_size: int = 80,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("num_per_target", num_per_target), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"Expected `{name}` to be >= 1, but got {value}.")
        if prompts is not None and not (prompts and all(isinstance(prompt, str) for prompt in prompts)):
            raise ValueError(f"Expected `prompts` to be a non-empty list of strings (or None), but got {prompts!r}.")
        self.save_hyperparameters(ignore=["labelled_data"], logger=False)
        self.labelled_data = labelled_data or DigitsDataModule()
        self.model = load_off_the_shelf(model_path, "data.model_path").eval().requires_grad_(False)
        self.dataset: _EmbeddingTargetsDataset | None = None

    @torch.no_grad()
    def target_rows(self) -> dict[str, torch.Tensor]:
        """Every sample's target embedding and the class it names (-1 for a prompt)."""
        if self.hparams.prompts is not None:
            if not hasattr(self.model, "text_embeddings"):
                raise ValueError(
                    f"`data.prompts` need a CLIP model with a text tower, but `data.model_path`="
                    f"{self.hparams.model_path!r} is a {type(self.model).__name__}."
                )
            embeddings = self.model.text_embeddings(self.hparams.prompts)
            classes = torch.full((len(embeddings),), -1)
        else:
            images, classes = reference_images(self.labelled_data)
            embeddings = embed_images(self.model, images)
        repeats = self.hparams.num_per_target
        return {
            "target_embedding": embeddings.cpu().repeat_interleave(repeats, dim=0),
            "target_class": classes.repeat_interleave(repeats),
        }

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = _EmbeddingTargetsDataset(self.target_rows(), self.hparams.seed)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.predict_dataloader()
