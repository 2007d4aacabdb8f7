"""CLIP as a guide, on a tiny random CLIPModel of the real class, and the digits' image embedder that plays its part."""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from plugguide.datamodules import DigitsDataModule, EmbeddingTargetDataModule, reference_images
from plugguide.models import CLIPImageEmbedder, ImageEmbedder, embed_images, load_off_the_shelf, load_text_encoder
from plugguide.modules import EmbedderPretraining
from plugguide.pipelines import GuidedDiffusionPipeline, guided
from plugguide.pipelines.guidance import PredictedCleanImageGuidance
from plugguide.pipelines.tasks import EmbeddingSimilarityTask, default_task
from tests.conftest import TINY_UNET
from tests.test_cli import run, sampling_overrides
from tests.test_guide_distillation import write_tiny_text_to_image_pipeline
from tests.test_pretraining import fit_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECTION_DIM = 8


def write_tiny_clip(path: str) -> None:
    """A CLIPModel of the real class with small sizes (32 px images, 8-d projections), its letter tokenizer and an image
    processor that resizes to 32 with a mean and std of its own (so a test sees them read from the file)."""
    torch.manual_seed(0)
    text = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    config = CLIPConfig(text_config=text, vision_config=vision | dict(patch_size=8), projection_dim=PROJECTION_DIM)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.3, 0.25],
    ).save_pretrained(path)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = (
        {"<|startoftext|>": 0, "<|endoftext|>": 1}
        | {c: 2 + i for i, c in enumerate(letters)}
        | {c + "</w>": 28 + i for i, c in enumerate(letters)}
    )
    with open(os.path.join(path, "vocab.json"), "w") as file:
        json.dump(vocab, file)
    with open(os.path.join(path, "merges.txt"), "w") as file:
        file.write("#version: 0.2\n")
    CLIPTokenizer(
        os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), model_max_length=16
    ).save_pretrained(path)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-clip"))
    write_tiny_clip(path)
    return path


@pytest.fixture(scope="module")
def clip(clip_path) -> CLIPImageEmbedder:
    return load_off_the_shelf(clip_path, "classifier").eval().requires_grad_(False)


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image without pixel-scale noise (a resize of it is well defined to a few grey levels)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BILINEAR))


# -- the image tower ------------------------------------------------------------------------------------------------


def test_clip_loads_by_path_and_says_its_task(clip, clip_path):
    assert isinstance(clip, CLIPImageEmbedder) and clip.embedding_dim == PROJECTION_DIM
    task = default_task(clip)
    assert isinstance(task, EmbeddingSimilarityTask) and task.embedding_dim == PROJECTION_DIM
    assert task.scale == pytest.approx(float(CLIPModel.from_pretrained(clip_path).logit_scale.exp()))
    torch.testing.assert_close(clip.image_mean.flatten(), torch.tensor([0.4, 0.5, 0.6]))  # the file's, not the default


def test_embeddings_are_unit_vectors_and_the_gradient_reaches_the_image(clip):
    images = (torch.rand(3, 3, 48, 40) * 2 - 1).requires_grad_(True)
    embeddings = clip(images)
    assert embeddings.shape == (3, PROJECTION_DIM)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    (grad,) = torch.autograd.grad(embeddings[:, 0].sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize(
    "height, width, fixed_size",
    [(96, 96, False), (80, 128, False), (80, 128, True)],
    ids=["square", "wide-cropped", "fixed-size-uncropped"],
)
def test_preprocessing_is_the_image_processors(clip, clip_path, height, width, fixed_size):
    """Resize (shortest edge, or to a fixed size; antialiased bicubic), centre crop where the processor crops, and
    normalisation as `CLIPImageProcessor` does them, on pixel noise (where a resize without antialiasing, or another
    crop, is far off), to a grey level."""
    processor = CLIPImageProcessor.from_pretrained(clip_path)
    if fixed_size:  # a checkpoint whose processor resizes to 32 x 48 and does not crop
        processor = CLIPImageProcessor(
            **processor.to_dict() | dict(size={"height": 32, "width": 48}, do_center_crop=False)
        )
        clip = CLIPImageEmbedder(clip.model, processor)
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = processor(images=image, return_tensors="pt").pixel_values
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    got = clip.preprocess(tensor)
    assert got.shape == expected.shape == (1, 3, 32, 48 if fixed_size else 32)
    # One grey level is 1/255 of the range; divided by the smallest std, 0.2, about 0.02 of a normalised value.
    assert (got - expected).abs().mean() < 0.01 and (got - expected).abs().max() < 0.03


def test_a_vision_tower_alone_embeds_images_and_refuses_text(tmp_path):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    CLIPVisionModelWithProjection(vision).save_pretrained(str(tmp_path / "vision"))
    embedder = load_off_the_shelf(str(tmp_path / "vision"), "classifier")
    assert embedder(torch.zeros(1, 3, 32, 32)).shape == (1, vision.projection_dim)
    with pytest.raises(ValueError, match="image tower only"):
        embedder.text_embeddings("a dog")


def test_a_hub_id_is_asked_for_its_config_but_a_mistyped_local_path_is_not(clip_path, monkeypatch):
    """`owner/name` whose owner is no local folder is looked up (a CLIP config loads CLIP); a typo under assets/ keeps the
    local loader's error, without a network round trip."""
    import transformers

    from plugguide.models.off_the_shelf import is_clip_hub_id

    asked = []

    def config_of(name, *args, **kwargs):
        asked.append(name)
        return CLIPConfig.from_pretrained(clip_path)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config_of)
    monkeypatch.chdir(ROOT)
    assert is_clip_hub_id("openai/clip-vit-base-patch32") and asked == ["openai/clip-vit-base-patch32"]
    with pytest.raises(FileNotFoundError, match="`classifier`='assets/classifier-typo'"):
        load_off_the_shelf("assets/classifier-typo", "classifier")
    assert asked == ["openai/clip-vit-base-patch32"]


# -- the task -------------------------------------------------------------------------------------------------------


def test_the_log_likelihood_rises_along_its_own_gradient(clip):
    guidance = PredictedCleanImageGuidance(clip)
    target = clip.text_embeddings("a red fish")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    targets, t = target.repeat(2, 1), torch.zeros(2, dtype=torch.long)
    grad = guidance.gradient(x, t, x, targets)
    before = guidance.log_likelihood(x, t, targets)
    after = guidance.log_likelihood(x + 1e-3 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1), t, targets)
    assert (after > before).all()
    assert before == pytest.approx(guidance.task.scale * torch.cosine_similarity(clip(x), targets), rel=1e-5)


@pytest.mark.parametrize(
    "targets, match",
    [
        (torch.tensor([3, 1]), r"`targets` .* one real embedding per sample, \(B, D\)"),
        (torch.randn(2, 5), rf"`targets` .* {PROJECTION_DIM} dimensions"),
        (torch.zeros(2, PROJECTION_DIM), "`targets` .* zero vector"),
        (torch.full((2, PROJECTION_DIM), float("nan")), "`targets` .* NaN"),
    ],
    ids=["class-labels", "another-models-dimension", "zero", "nan"],
)
def test_bad_targets_are_refused_naming_targets(clip, targets, match):
    guidance = PredictedCleanImageGuidance(clip)
    with pytest.raises(ValueError, match=match):
        guidance.check_targets(targets)
    unet = UNet2DModel(**TINY_UNET | dict(sample_size=32, in_channels=3, out_channels=3))
    pipe = GuidedDiffusionPipeline(unet, DDIMScheduler(), guidance)
    with pytest.raises(ValueError, match=match):  # before any step is sampled
        pipe(targets=targets, num_inference_steps=1, classifier_scale=1.0)


def test_a_task_without_the_embedding_size_checks_the_shape_at_the_gradient(clip):
    guidance = PredictedCleanImageGuidance(clip, task=EmbeddingSimilarityTask(scale=10.0))
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=rf"`targets` .* \(2, {PROJECTION_DIM}\)"):
        guidance.gradient(x, torch.zeros(2, dtype=torch.long), x, torch.randn(2, 5))


# -- guiding samplers ------------------------------------------------------------------------------------------------


def test_x0_hat_guidance_moves_samples_toward_the_reference_embedding(clip):
    """The mean cosine of the samples with a reference image's embedding rises over unguided sampling, same seeds."""
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET | dict(sample_size=32, in_channels=3, out_channels=3))
    reference = clip(torch.from_numpy(smooth_image(32, 32, seed=1)).permute(2, 0, 1)[None].float() / 127.5 - 1)
    pipe = GuidedDiffusionPipeline(unet, DDIMScheduler(), PredictedCleanImageGuidance(clip))
    pipe.set_progress_bar_config(disable=True)
    targets = reference.repeat(4, 1)

    def mean_cosine(scale: float) -> float:
        images = pipe(
            targets=targets,
            num_inference_steps=5,
            classifier_scale=scale,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
        return float(torch.cosine_similarity(clip(images * 2 - 1), targets).mean())

    # A random tiny CLIP puts every image near every other (cosines near 1): the distance 1 - cos shrinks.
    assert 1 - mean_cosine(3.0) < 0.7 * (1 - mean_cosine(0.0))


@pytest.mark.parametrize("preset", ["DPS", "LGD", "FreeDoM", "MPGD", "UGD", "TFG"])
def test_every_training_free_preset_guides_with_clip(clip, preset):
    """The presets take a guide and a task as `ClassifierGuidance` does: CLIP and its task go in unchanged."""
    from plugguide.pipelines import guidance as methods

    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET | dict(sample_size=32, in_channels=3, out_channels=3))
    method = getattr(methods, preset)(clip)
    assert isinstance(method.task, EmbeddingSimilarityTask)
    pipe = GuidedDiffusionPipeline(unet, DDIMScheduler(), method)
    pipe.set_progress_bar_config(disable=True)
    targets = clip.text_embeddings("a red fish").repeat(2, 1)
    images = {
        scale: pipe(
            targets=targets,
            num_inference_steps=3,
            classifier_scale=scale,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
        for scale in (0.0, 3.0)
    }
    assert torch.isfinite(images[3.0]).all() and (images[3.0] - images[0.0]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-sd"))
    write_tiny_text_to_image_pipeline(path)
    return path


def test_guided_stable_diffusion_runs_with_clip_toward_a_prompt(clip, sd_path):
    encoder, tokenizer = load_text_encoder(sd_path)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(sd_path, subfolder="vae"),
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet"),
        scheduler=DDIMScheduler.from_pretrained(sd_path, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    targets = clip.text_embeddings("a watercolor").repeat(2, 1)

    def sample(scale: float) -> torch.Tensor:
        with guided(pipe, PredictedCleanImageGuidance(clip), classifier_scale=scale, targets=targets):
            return pipe(
                "a dog",
                num_images_per_prompt=2,
                num_inference_steps=3,
                height=16,
                width=16,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images

    unguided, guided_images = sample(0.0), sample(50.0)
    assert torch.isfinite(guided_images).all() and (guided_images - unguided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="`targets`"):
        with guided(pipe, PredictedCleanImageGuidance(clip), classifier_scale=1.0, targets=[3, 3]):
            pass


def test_clip_sd15_config_runs_on_tiny_models_of_the_same_classes(clip_path, sd_path, tmp_path, monkeypatch):
    """configs/hub/clip_sd15.yaml: SD's UNet, VAE and prompt, CLIP on the decoded x0_hat, the prompt's targets."""
    monkeypatch.chdir(tmp_path)
    model = {
        "diffusion_model": sd_path,
        "vae": sd_path,
        "num_inference_steps": 2,
        "guidance": {
            "class_path": "plugguide.pipelines.guidance.PredictedCleanImageGuidance",
            "init_args": {"classifier": clip_path},
        },
    }
    data = {"model_path": clip_path, "num_per_target": 3, "batch_size": 2}
    overrides = sampling_overrides(tmp_path, model, data, precision="32-true")
    run("predict", "hub/clip_sd15.yaml", overrides, tmp_path)
    assert np.load(tmp_path / "out/samples.npz")["images"].shape == (3, 3, 16, 16)  # decoded to pixels


# -- the digits' embedder -------------------------------------------------------------------------------------------


def test_the_embedders_contrastive_loss_falls_and_its_float16_export_loads_back(tmp_path):
    torch.manual_seed(0)
    module = EmbedderPretraining(ImageEmbedder(channels=[8, 16], embedding_dim=8), export_dtype="float16")
    images, _ = DigitsDataModule().split_images("train")
    batch = {"image": images[:32], "label": torch.zeros(32, dtype=torch.long)}
    losses = fit_steps(module, batch, 30, 1e-2)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    module.export(str(tmp_path / "embedder"))
    loaded = load_off_the_shelf(str(tmp_path / "embedder"), "classifier")
    assert isinstance(loaded, ImageEmbedder) and loaded.embedding_dim == 8 and loaded.logit_scale == 10.0
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    module.embedder.eval()
    torch.testing.assert_close(loaded(images[:4]), module.embedder(images[:4]), atol=5e-3, rtol=0)


def test_reference_digits_come_from_the_validation_split():
    digits = DigitsDataModule()
    images, classes = reference_images(digits)
    val_images, val_labels = digits.split_images("val")
    assert classes.tolist() == list(range(10))
    for image, label in zip(images, classes):  # each reference is the first val digit of its class
        first = int((val_labels == label).nonzero()[0, 0])
        assert torch.equal(image, val_images[first])
    with pytest.raises(ValueError, match="`split`.*metrics' reference"):
        reference_images(digits, "test")


def test_digit_targets_are_the_embedders_embeddings_of_the_references(tmp_path):
    torch.manual_seed(0)
    embedder = ImageEmbedder(channels=[8, 16], embedding_dim=8)
    embedder.save_pretrained(str(tmp_path / "embedder"))
    data = EmbeddingTargetDataModule(str(tmp_path / "embedder"), num_per_target=2, batch_size=20)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    expected = embed_images(embedder, reference_images(DigitsDataModule())[0]).repeat_interleave(2, dim=0)
    torch.testing.assert_close(batch["target_embedding"], expected)
    assert batch["target_class"].tolist() == [c for c in range(10) for _ in range(2)]
    assert (batch["label"] == -1).all()


def test_the_digits_sampling_job_guides_toward_reference_embeddings(tiny_assets, tmp_path, monkeypatch):
    """An unconditional digits model guided by the embedder toward each reference, scored by the evaluator against the
    reference's class (the row a results page measures)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ImageEmbedder(channels=[8, 16], embedding_dim=8).save_pretrained(str(tmp_path / "embedder"))
    model = {
        "diffusion_model": tiny_assets["ddpm-uncond"],
        "num_inference_steps": 2,
        "classifier_scale": 1.0,
        "guidance": {
            "class_path": "plugguide.pipelines.guidance.PredictedCleanImageGuidance",
            "init_args": {"classifier": str(tmp_path / "embedder")},
        },
        "evaluator_path": tiny_assets["evaluator"],
    }
    data = {"model_path": str(tmp_path / "embedder"), "num_per_target": 1, "batch_size": 10}
    overrides = sampling_overrides(tmp_path, model, data, data_class="plugguide.datamodules.EmbeddingTargetDataModule")
    run("predict", "sample.yaml", overrides, tmp_path)
    assert np.load(tmp_path / "out/samples.npz")["images"].shape == (10, 1, 16, 16)


def test_the_shipped_embedder_is_small_half_precision_and_groups_held_out_digits():
    """assets/digits/embedder: float16 under 1 MB, and a held-out digit's nearest other digit mostly shares its label
    (labels were never read in training)."""
    from safetensors.torch import load_file

    from plugguide.modules.embedder_pretraining import nearest_neighbour_accuracy

    path = os.path.join(ROOT, "assets", "digits", "embedder")
    assert os.path.getsize(os.path.join(path, "model.safetensors")) < 2**20
    assert {tensor.dtype for tensor in load_file(os.path.join(path, "model.safetensors")).values()} == {torch.float16}
    images, labels = DigitsDataModule().split_images("test")
    embeddings = embed_images(load_off_the_shelf(path, "classifier"), images)
    assert nearest_neighbour_accuracy(embeddings, labels) >= 0.8
