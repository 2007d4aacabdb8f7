"""The memory settings of latent guidance: the batch in chunks, decoder checkpointing, a lighter decoder for the
gradient; each gives the gradient it should and leaves the user's modules as they were."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMPipeline, DDIMScheduler, UNet2DModel

from plugguide.models import TimmClassifier
from plugguide.modules import GuidedSampling
from plugguide.pipelines import GuidedDiffusionPipeline, guided
from plugguide.pipelines.guidance import PredictedCleanImageGuidance
from plugguide.pipelines.score_shift import guidance_gradient
from tests.conftest import TINY_AUTOENCODER, TINY_RESNET, TINY_UNET, tiny_scheduler

LATENT_VAE = TINY_AUTOENCODER | dict(block_out_channels=(8, 8))
# A TAESD of the tiny VAE's latent space: 2 latent channels, one 2x upsampling.
TINY_TAESD = dict(
    in_channels=1,
    out_channels=1,
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    num_encoder_blocks=(1, 1),
    num_decoder_blocks=(1, 1),
    latent_channels=2,
)


@pytest.fixture
def latent_parts():
    """(VAE, guidance on x0_hat, latents, targets): a tiny VAE and classifier in eval mode, 5 samples."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**LATENT_VAE).eval()
    guidance = PredictedCleanImageGuidance(TimmClassifier(**TINY_RESNET).eval())
    return vae, guidance, torch.randn(5, 2, 8, 8), torch.tensor([1, 2, 3, 4, 5])


def latent_pipeline(**options) -> GuidedDiffusionPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(**LATENT_VAE).eval()
    unet = UNet2DModel(**TINY_UNET | dict(sample_size=8, in_channels=2, out_channels=2))
    guidance = PredictedCleanImageGuidance(TimmClassifier(**TINY_RESNET).eval())
    pipeline = GuidedDiffusionPipeline(
        unet, DDIMScheduler.from_config(tiny_scheduler().config), guidance, vae=vae, **options
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipeline, labels=(1, 2, 3)) -> torch.Tensor:
    return pipeline(
        list(labels),
        num_inference_steps=2,
        classifier_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_guidance_batch_size_gives_the_whole_batch_gradient(latent_parts):
    vae, guidance, latents, targets = latent_parts
    whole = guidance_gradient(guidance, vae, latents, torch.tensor(500), latents, targets)
    passes = []
    vae.decoder.register_forward_hook(lambda module, inputs, output: passes.append(len(inputs[0])))
    for batch_size, chunks in ((1, [1] * 5), (2, [2, 2, 1]), (3, [3, 2])):
        del passes[:]
        chunked = guidance_gradient(guidance, vae, latents, torch.tensor(500), latents, targets, batch_size=batch_size)
        assert passes == chunks
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    # The pipeline's samples too, with the batch in chunks of 2 and of 1.
    reference = sample(latent_pipeline())
    for batch_size in (1, 2):
        torch.testing.assert_close(
            sample(latent_pipeline(guidance_batch_size=batch_size)), reference, atol=1e-5, rtol=0
        )


def test_decoder_gradient_checkpointing_recomputes_the_blocks_in_eval_mode_and_restores_the_vae(latent_parts):
    vae, guidance, latents, targets = latent_parts
    calls = []
    vae.decoder.up_blocks[0].resnets[0].register_forward_hook(lambda *_: calls.append(1))
    before = {name: dict(vars(module)) for name, module in vae.named_modules()}
    plain = guidance_gradient(guidance, vae, latents, torch.tensor(500), latents, targets)
    assert len(calls) == 1
    checkpointed = guidance_gradient(
        guidance, vae, latents, torch.tensor(500), latents, targets, gradient_checkpointing=True
    )
    assert len(calls) == 3  # the forward pass, and the block again in the backward pass: checkpointing took effect
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=0)
    assert not vae.training and not vae.is_gradient_checkpointing
    after = {name: dict(vars(module)) for name, module in vae.named_modules()}
    assert {name: attributes.keys() for name, attributes in after.items()} == {
        name: attributes.keys() for name, attributes in before.items()
    }
    # A VAE the user set to checkpoint keeps checkpointing.
    vae.enable_gradient_checkpointing()
    guidance_gradient(guidance, vae, latents, torch.tensor(500), latents, targets, gradient_checkpointing=True)
    assert vae.is_gradient_checkpointing


def test_guidance_vae_decodes_for_the_gradient_and_the_vae_the_images():
    torch.manual_seed(0)
    tiny = AutoencoderTiny(**TINY_TAESD).eval()
    pipeline = latent_pipeline(guidance_vae=tiny)
    decodes = {"vae": 0, "guidance_vae": 0}
    pipeline.vae.decoder.register_forward_hook(lambda *_: decodes.__setitem__("vae", decodes["vae"] + 1))
    tiny.decoder.register_forward_hook(lambda *_: decodes.__setitem__("guidance_vae", decodes["guidance_vae"] + 1))
    images = sample(pipeline)
    assert decodes == {"vae": 1, "guidance_vae": 2}  # the output once; the gradient at both steps
    assert not torch.allclose(images, sample(latent_pipeline()))  # another gradient, so other samples
    assert images.shape == (3, 1, 16, 16)


def test_guided_stock_pipeline_takes_the_same_settings():
    """Inside a stock pipeline (`guided`), chunks and checkpointing give the same samples, and take effect."""
    pipeline = latent_pipeline()
    calls = []
    pipeline.vae.decoder.up_blocks[0].resnets[0].register_forward_hook(lambda *_: calls.append(1))
    stock = DDIMPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
    stock.vae = pipeline.vae  # a latent DDIM pipeline, as far as `guided` reads it
    stock.set_progress_bar_config(disable=True)

    def run(**options):
        with guided(stock, pipeline.guidance, classifier_scale=5.0, targets=[1, 2, 3], **options):
            return stock(
                batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
            )

    del calls[:]
    reference = run()
    plain_calls = len(calls)
    del calls[:]
    torch.testing.assert_close(
        torch.as_tensor(run(guidance_batch_size=1, decoder_gradient_checkpointing=True).images),
        torch.as_tensor(reference.images),
        atol=1e-5,
        rtol=0,
    )
    assert len(calls) == 3 * 2 * plain_calls  # three chunks, each block run twice
    assert not pipeline.vae.is_gradient_checkpointing


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="`guidance_batch_size`"):
        latent_pipeline(guidance_batch_size=0)
    with pytest.raises(ValueError, match="`guidance_vae` AutoencoderTiny decodes latents of 4 channels"):
        latent_pipeline(guidance_vae=AutoencoderTiny(**TINY_TAESD | dict(latent_channels=4)))
    unet, scheduler = UNet2DModel(**TINY_UNET), tiny_scheduler()
    for option in (dict(guidance_vae=AutoencoderTiny(**TINY_TAESD)), dict(decoder_gradient_checkpointing=True)):
        with pytest.raises(ValueError, match=f"`{next(iter(option))}` acts on the VAE decoder"):
            GuidedDiffusionPipeline(unet, scheduler, None, **option)
    with pytest.raises(ValueError, match="`guidance_batch_size`"):
        with guided(latent_pipeline(), latent_pipeline().guidance, 1.0, [1], guidance_batch_size=-2):
            pass


def test_sampling_job_passes_the_settings_to_its_pipeline(tiny_assets, tmp_path):
    torch.manual_seed(0)
    AutoencoderTiny(**TINY_TAESD).save_pretrained(str(tmp_path / "taesd"))
    job = GuidedSampling(
        diffusion_model=tiny_assets["ddpm-uncond"],
        vae=tiny_assets["autoencoder"],
        evaluator_path=None,
        guidance_batch_size=2,
        guidance_vae=str(tmp_path / "taesd"),
        decoder_gradient_checkpointing=True,
    )
    pipeline = job.pipeline
    assert pipeline.guidance_batch_size == 2 and pipeline.decoder_gradient_checkpointing
    assert isinstance(pipeline.guidance_vae, AutoencoderTiny) and pipeline.guidance_decoder is pipeline.guidance_vae


def test_pipeline_saves_and_loads_its_guidance_vae(tmp_path):
    torch.manual_seed(0)
    latent_pipeline(guidance_vae=AutoencoderTiny(**TINY_TAESD).eval()).save_pretrained(str(tmp_path / "latent"))
    loaded = GuidedDiffusionPipeline.from_pretrained(str(tmp_path / "latent"))
    assert isinstance(loaded.guidance_vae, AutoencoderTiny) and isinstance(loaded.vae, AutoencoderKL)
    GuidedDiffusionPipeline(UNet2DModel(**TINY_UNET), tiny_scheduler()).save_pretrained(str(tmp_path / "pixels"))
    loaded = GuidedDiffusionPipeline.from_pretrained(str(tmp_path / "pixels"))  # absent components load as None
    assert loaded.vae is None and loaded.guidance_vae is None and loaded.text_encoder is None


@pytest.mark.parametrize("batch_size", [None, 2])
def test_a_float16_force_upcast_vae_decodes_the_gradient_in_float32_in_every_pipeline(latent_parts, batch_size):
    """`guidance_gradient` (GuidedDiffusionPipeline and `guided` alike) runs SDXL-style VAEs in float32, chunked or not,
    and hands them back in float16."""
    vae, guidance, latents, targets = latent_parts
    vae.register_to_config(force_upcast=True)
    vae.to(torch.float16)
    seen = []
    vae.decoder.conv_in.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    grad = guidance_gradient(
        guidance, vae, latents.half(), torch.tensor(500), latents.half(), targets, batch_size=batch_size
    )
    assert seen and set(seen) == {torch.float32} and vae.dtype == torch.float16
    assert grad.dtype == torch.float16 and bool(torch.isfinite(grad).all())
