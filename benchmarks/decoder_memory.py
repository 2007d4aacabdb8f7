"""What latent guidance costs: memory and time of the gradient through the real Stable Diffusion VAE decoders, and
the FLOPs of a guided step against an unguided one on real-size denoisers.

    python benchmarks/decoder_memory.py [--memory-budget-gb 8] [--device cpu] [--page docs/results/decoder_memory.md]

Memory: one guidance gradient (`pipelines.score_shift.guidance_gradient`: decode x0_hat, a ResNet-18 ImageNet
classifier at 224 px, backward through the classifier and the decoder to the latents) with random weights, on the SD
1.5 / SDXL `AutoencoderKL` decoder (one architecture, the configs below) and on TAESD (`AutoencoderTiny`), at 256,
512 and 1024 pixels, with each lever on and off: `guidance_batch_size` (the batch in chunks), decoder gradient
checkpointing, the tiny decoder. Each configuration runs once in a fresh process: on CPU its peak resident memory
above what it held after loading (Linux's peak is reset after loading), on CUDA `max_memory_allocated` above the
loaded models. A configuration whose estimate (its basis row times the pixel or batch factor) exceeds
`--memory-budget-gb` is not run; its row is that estimate, marked extrapolated.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` on the "meta" device (no weights allocated; it counts meta
tensors): one pass of ADM ImageNet-256, SD 1.5's and SDXL's UNets, one pass of the `ShiftGuide` the hub configs build,
and one guided step, the denoiser plus a ResNet-50's forward and backward (through the decoder for the latent models).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel, UNet2DModel
from memory import peak_rss
from torch.utils.flop_counter import FlopCounterMode

from plugguide.models import TimmClassifier
from plugguide.models.shift_guide import ShiftGuide
from plugguide.pipelines.guidance import PredictedCleanImageGuidance
from plugguide.pipelines.score_shift import decode_latents, guidance_gradient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the table scripts' page writer
from results_page import add_page_arguments, write_between_markers  # noqa: E402

# The VAE configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 (vae/config.json): one decoder
# architecture (49.5M parameters), different latent scalings.
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SDXL_VAE = SD15_VAE | dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
DECODERS = {"kl": "SD 1.5 / SDXL VAE decoder", "tiny": "TAESD (AutoencoderTiny)"}
# ADM unconditional ImageNet-256 (Dhariwal & Nichol, 2021: 256 channels, multipliers 1,1,2,2,4,4, 2 res blocks,
# attention at 32, 16, 8 with 64-channel heads, BigGAN up/down blocks, scale-shift norm, learned variance) as the
# diffusers `UNet2DModel` of configs/hub/ppap_imagenet256.yaml's xutongda/adm_imagenet_256x256_unconditional.
ADM_IMAGENET256 = dict(
    sample_size=256,
    in_channels=3,
    out_channels=6,
    block_out_channels=(256, 256, 512, 512, 1024, 1024),
    layers_per_block=2,
    down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,
    up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 3,
    attention_head_dim=64,
    resnet_time_scale_shift="scale_shift",
    downsample_type="resnet",
    upsample_type="resnet",
)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # UNet2DConditionModel's defaults are SD 1.x's
SDXL_UNET = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# The ShiftGuides of configs/hub/guidance_distillation_imagenet256.yaml and guidance_distillation_sd15.yaml (SDXL: the
# SD 1.5 guide's widths at SDXL's latents, no hub config builds one).
GUIDES = {"adm": ((64, 128, 256, 256), 1), "sd15": ((64, 128, 256), 1), "sdxl": ((64, 128, 256), 1)}


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration of the guidance gradient, and how to estimate it from another row."""

    decoder: str
    pixels: int
    batch: int = 1
    guidance_batch_size: int | None = None
    checkpointing: bool = False
    basis: int | None = None  # index of the row it is estimated from
    memory_factor: float = 1.0
    time_factor: float = 1.0

    def levers(self) -> str:
        levers = [f"guidance_batch_size {self.guidance_batch_size}"] if self.guidance_batch_size else []
        levers += ["decoder checkpointing"] if self.checkpointing else []
        levers += ["TAESD for the gradient"] if self.decoder == "tiny" else []
        return ", ".join(levers) or "none"


ROWS = [
    Row("kl", 256),  # 0
    Row("kl", 512, basis=0, memory_factor=4, time_factor=4),  # 1
    Row("kl", 512, checkpointing=True, basis=1, time_factor=1.3),  # 2
    Row("kl", 1024, basis=1, memory_factor=4, time_factor=4),  # 3
    Row("kl", 1024, checkpointing=True, basis=2, memory_factor=4, time_factor=4),  # 4
    Row("kl", 256, batch=4, basis=0, memory_factor=4, time_factor=4),  # 5
    Row("kl", 256, batch=4, guidance_batch_size=1, basis=0, time_factor=4),  # 6
    Row("kl", 1024, batch=4, basis=3, memory_factor=4, time_factor=4),  # 7
    Row("kl", 1024, batch=4, guidance_batch_size=1, checkpointing=True, basis=4, time_factor=4),  # 8
    Row("tiny", 512),  # 9
    Row("tiny", 512, checkpointing=True, basis=9, time_factor=1.3),  # 10
    Row("tiny", 1024, basis=9, memory_factor=4, time_factor=4),  # 11
    Row("tiny", 1024, batch=4, basis=11, memory_factor=4, time_factor=4),  # 12
    Row("tiny", 1024, batch=4, guidance_batch_size=1, basis=11, time_factor=4),  # 13
]


def build_decoder(decoder: str, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return (AutoencoderKL(**SDXL_VAE) if decoder == "kl" else AutoencoderTiny()).eval().to(device)


def build_guidance(model_name: str, device: str = "cpu") -> PredictedCleanImageGuidance:
    """An ImageNet timm classifier of random weights reading x0_hat, resized to 224 px as hub classifiers are."""
    classifier = TimmClassifier(model_name, num_classes=1000, in_chans=3, normalize_input=True, input_size=224)
    return PredictedCleanImageGuidance(classifier.eval()).to(device)


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def measure(row: Row, device: str, queue) -> None:
    """Child process: (peak memory above the loaded models in MiB, seconds) of one guidance gradient of `row`."""
    vae, guidance = build_decoder(row.decoder, device), build_guidance("resnet18", device)
    latents = torch.randn(row.batch, 4, row.pixels // 8, row.pixels // 8, device=device)
    targets = torch.arange(row.batch, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear:  # resets the peak resident memory to the current one
            clear.write("5")
        loaded = resident_mib()
    started = time.perf_counter()
    guidance_gradient(
        guidance,
        vae,
        latents,
        torch.tensor(500),
        latents,
        targets,
        batch_size=row.guidance_batch_size,
        gradient_checkpointing=row.checkpointing,
    )
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - loaded) / 2**20
    else:
        peak = peak_rss() - loaded
    queue.put((peak, time.perf_counter() - started))


def memory_rows(budget_gb: float, device: str) -> list[tuple[Row, float, float, bool]]:
    """(row, peak GB, seconds, measured) of every row, each run in a fresh process unless its estimate is over budget."""
    context = multiprocessing.get_context("spawn")
    results = []
    for row in ROWS:
        estimate = None
        if row.basis is not None:
            _, basis_gb, basis_seconds, _ = results[row.basis]
            estimate = (basis_gb * row.memory_factor, basis_seconds * row.time_factor)
        if estimate is not None and estimate[0] > budget_gb:
            results.append((row, *estimate, False))
        else:
            queue = context.Queue()
            process = context.Process(target=measure, args=(row, device, queue))
            process.start()
            peak, seconds = queue.get()
            process.join()
            results.append((row, peak / 1024, seconds, True))
        print(results[-1], flush=True)
    return results


def memory_table(results, budget_gb: float, device: str) -> str:
    lines = [
        f"One guidance gradient on {device} (fp32, {torch.get_num_threads()} threads): decode x0_hat, a ResNet-18 "
        f"classifier at 224 px, backward to the latents; random weights. Peak memory above the loaded models, in a fresh "
        f"process per row; rows whose estimate exceeded {budget_gb:g} GB were not run and are extrapolated from the row "
        f"named (memory and time scale with the pixel count and with the samples per pass).",
        "",
        "| decoder | pixels | batch | levers | peak memory (GB) | time (s) | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, (row, peak_gb, seconds, measured) in enumerate(results):
        source = "measured" if measured else f"**extrapolated** from row {row.basis + 1}"
        lines.append(
            f"| {index + 1}. {DECODERS[row.decoder]} | {row.pixels} | {row.batch} | {row.levers()} | {peak_gb:.2f} | "
            f"{seconds:.1f} | {source} |"
        )
    return "\n".join(lines)


def count_flops(function) -> float:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def gradient_pass(guidance, vae, latents, timesteps, targets) -> None:
    """The arithmetic of `guidance_gradient` (decode, classify, backward to the input) in one `autograd.grad`: the
    module tracker of `FlopCounterMode` refuses a leaf tensor handed straight to a module under `autograd.grad`."""
    leaf = latents.clone().requires_grad_(True)
    with torch.enable_grad():
        pixels = decode_latents(vae, leaf).clamp(-1, 1)
        torch.autograd.grad(guidance.log_likelihood(pixels, timesteps, targets).sum(), leaf)


def flops_table() -> str:
    """FLOPs of one image's denoiser pass, guide pass and guided step on the meta device."""
    with torch.device("meta"):
        classifier = build_guidance("resnet50", "meta")
        decoder, tiny = AutoencoderKL(**SDXL_VAE), AutoencoderTiny()
        models = {
            "ADM ImageNet-256 (UNet2DModel)": ("adm", UNet2DModel(**ADM_IMAGENET256), 3, 256, None),
            "SD 1.5 UNet (64x64 latents, 512 px)": ("sd15", UNet2DConditionModel(**SD15_UNET), 4, 64, decoder),
            "SDXL UNet (128x128 latents, 1024 px)": ("sdxl", UNet2DConditionModel(**SDXL_UNET), 4, 128, decoder),
        }
    lines = [
        "FLOPs per image (`FlopCounterMode`, meta device; multiply-adds count 2). Guided step: the denoiser pass plus the "
        "classifier's forward and backward to its input, a ResNet-50 at 224 px (decoding x0_hat and back through the "
        "decoder for latent models); with CFG the denoiser pass is two.",
        "",
        "| denoiser | parameters | denoiser pass (TFLOPs) | ShiftGuide pass (TFLOPs) | guide / denoiser | guided step "
        "(TFLOPs) | guided / unguided step | with CFG: guided / unguided | TAESD for the gradient: guided / unguided |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (key, unet, channels, size, vae) in models.items():
        with torch.device("meta"):
            sample = torch.randn(1, channels, size, size)
            timestep = torch.tensor([500])
            extra = {}
            if isinstance(unet, UNet2DConditionModel):
                extra["encoder_hidden_states"] = torch.randn(1, 77, unet.config.cross_attention_dim)
                if unet.config.addition_embed_type == "text_time":
                    extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
            widths, layers = GUIDES[key]
            guide = ShiftGuide(size, channels, 1000, widths, layers)
            targets = torch.tensor([1])
        with torch.no_grad():
            denoiser = count_flops(lambda: unet(sample, timestep, **extra))
            guide_pass = count_flops(lambda: guide(sample, sample, timestep, targets, 1.0))
        gradient = count_flops(lambda: gradient_pass(classifier, vae, sample, timestep, targets))
        tiny_gradient = (
            gradient
            if vae is None
            else count_flops(lambda: gradient_pass(classifier, tiny, sample, timestep, targets))
        )
        parameters = sum(p.numel() for p in unet.parameters()) / 1e6
        lines.append(
            f"| {name} | {parameters:.0f}M | {denoiser / 1e12:.3f} | {guide_pass / 1e12:.3f} | {guide_pass / denoiser:.3f} "
            f"| {(denoiser + gradient) / 1e12:.3f} | {(denoiser + gradient) / denoiser:.2f} | "
            f"{(2 * denoiser + gradient) / (2 * denoiser):.2f} | "
            f"{'-' if vae is None else f'{(denoiser + tiny_gradient) / denoiser:.2f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-budget-gb", type=float, default=8.0, help="largest estimated peak to run")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--skip-memory", action="store_true", help="only the FLOPs table")
    add_page_arguments(parser, "decoder-memory-table")
    args = parser.parse_args()
    flops = flops_table()
    print(flops, flush=True)
    if args.page:
        write_between_markers(args.page, "decoder-flops-table", flops)
    if args.skip_memory:
        return
    memory = memory_table(memory_rows(args.memory_budget_gb, args.device), args.memory_budget_gb, args.device)
    print(memory)
    if args.page:
        write_between_markers(args.page, args.marker, memory)


if __name__ == "__main__":
    main()
