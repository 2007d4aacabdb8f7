"""Guide a stock diffusers pipeline (SDXL, SD3, Flux, Stable Diffusion, ...) toward a class of an off-the-shelf
classifier.

    python -m plugguide.guide_stock_pipeline --pipeline-id stabilityai/stable-diffusion-xl-base-1.0 \\
        --classifier timm:resnet50.a1_in1k --class-id 207 --prompt "a photo of a dog" \\ [--method calibrated]
        [--classifier-scale 10] [--guidance-scale 5] [--steps 30] [--num-images 4] [--dtype float32]

The pipeline is loaded as it is (`DiffusionPipeline.from_pretrained`) and run as it is, its own scheduler, CFG and VAE,
inside `with guided(pipe, guidance, classifier_scale, targets)` (`plugguide.pipelines.guided`): at every evaluation the
classifier sees the VAE decoder's image of x0_hat (or of x_t), in [-1, 1], resized and normalised to its own input (a
`timm:` model keeps its ImageNet head), and its gradient flows back through the decoder to the latents (Ma et al.,
2023, section 5.3). Methods: `calibrated` (`CalibratedGuidance`: Softplus, joint/marginal temperatures; EluCD),
`predicted-clean` (`PredictedCleanImageGuidance`, the plain classifier on x0_hat), `ppap` (`ExpertGuidance`, PPAP
experts exported by `lightning fit`, `--experts DIR`; they must have been distilled for this model's images).
`--guidance-scale` is the pipeline's own (CFG weight; Flux-dev's distilled guidance). Images are written to `--output-dir` as
PNG.
"""

from __future__ import annotations

import argparse
import os

import torch
from diffusers import DiffusionPipeline

from plugguide.pipelines import guided
from plugguide.pipelines.guidance import CalibratedGuidance, ExpertGuidance, PredictedCleanImageGuidance

METHODS = ("calibrated", "predicted-clean", "ppap")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_guidance(method: str, classifier: str | None, experts: str | None):
    """The `Guidance` of `method`: on `classifier` (a saved `TimmClassifier` path, `timm:<name>` or `hf-hub:<repo>`),
    or
    PPAP's `experts` directory."""
    if method not in METHODS:
        raise ValueError(f"Expected `--method` to be one of {', '.join(METHODS)}, but got {method!r}.")
    if method == "ppap":
        if experts is None:
            raise ValueError(
                "`--method` ppap needs `--experts`, the experts/ folder `lightning fit -c configs/ppap.yaml` exports."
            )
        return ExpertGuidance(experts)
    if classifier is None:
        raise ValueError(
            f"`--method` {method} needs `--classifier` (timm:<name>, hf-hub:<repo> or a saved TimmClassifier)."
        )
    return (CalibratedGuidance if method == "calibrated" else PredictedCleanImageGuidance)(classifier)


def generate(
    pipe: DiffusionPipeline, guidance, class_id: int, num_images: int, classifier_scale: float, seed: int = 0, **call
) -> list:
    """`num_images` PIL images of `pipe(**call)` guided toward `class_id`, one generator per image seeded seed, seed
    + 1, ..."""
    device = getattr(pipe, "_execution_device", "cpu")
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(num_images)]
    with guided(pipe, guidance, classifier_scale=classifier_scale, targets=[class_id] * num_images):
        return pipe(generator=generators, **call).images


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline-id", required=True, help="a hub id or a local folder of a diffusers pipeline")
    parser.add_argument(
        "--classifier", default=None, help="timm:<name>, hf-hub:<repo>, or a saved TimmClassifier folder"
    )
    parser.add_argument(
        "--class-id", type=int, required=True, help="the classifier's class to guide toward (ImageNet: 0..999)"
    )
    parser.add_argument("--prompt", default="")
    parser.add_argument("--method", default="calibrated", choices=METHODS)
    parser.add_argument("--experts", default=None, help="PPAP experts folder, for --method ppap")
    parser.add_argument("--classifier-scale", type=float, default=10.0, help="the guidance gradient scale s")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="the pipeline's own guidance_scale (default: the pipeline's)",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output-dir", default="runs/guided_stock_pipeline", help="the folder the images are written to"
    )
    args = parser.parse_args(argv)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline_id, torch_dtype=DTYPES[args.dtype]).to(args.device)
    guidance = make_guidance(args.method, args.classifier, args.experts)
    call = {"prompt": args.prompt, "num_images_per_prompt": args.num_images, "num_inference_steps": args.steps}
    call |= {
        name: value
        for name, value in (("guidance_scale", args.guidance_scale), ("height", args.height), ("width", args.width))
        if value is not None
    }
    images = generate(pipe, guidance, args.class_id, args.num_images, args.classifier_scale, args.seed, **call)
    os.makedirs(args.output_dir, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = os.path.join(args.output_dir, f"class{args.class_id}-{index:03d}.png")
        image.save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)
        paths.append(path)
    print("\n".join(paths))
    return paths


if __name__ == "__main__":
    main()
