"""The ground floor: plain `nn.Module`s and how they load and save, in hub formats; no Lightning.

Classifiers (`TimmClassifier`), dense models (`DenseModel`: segmenters, depth regressors), image embedders (CLIP's
image tower as `CLIPImageEmbedder`, the digits' `ImageEmbedder`) and the one loader of them all
(`load_off_the_shelf`), the PPAP multi-expert wrapper (`MultiExpertModel`), the guide networks
of plug-and-play distillation (`TinyGuide`, `FullGuide`) and of distilled gradient guidance (`ShiftGuide`), and the loaders of diffusers denoisers,
schedulers, VAEs and text encoders, and their speed settings (autocast, compilation). Every other folder stands on this one.
"""

from plugguide.models.classifier import TimmClassifier, check_classifier_input, load_classifier
from plugguide.models.clip_embedder import CLIPImageEmbedder, load_clip_embedder
from plugguide.models.denoiser_speed import AUTOCAST_DTYPES, compile_denoiser, denoiser_autocast, parse_autocast_dtype
from plugguide.models.dense_model import DenseModel, load_dense_model
from plugguide.models.diffusion_model import (
    SCHEDULER_FAMILIES,
    SUPPORTED_SCHEDULERS,
    load_scheduler,
    load_unet,
    load_vae,
)
from plugguide.models.grid_ddim import GridDDIMScheduler, sampler_on_grid
from plugguide.models.guides import FullGuide, Guide, TinyGuide, load_guide, predict_guided_noise
from plugguide.models.image_embedder import ImageEmbedder, embed_images, load_image_embedder
from plugguide.models.multi_expert_model import MultiExpertModel, expert_boundaries
from plugguide.models.off_the_shelf import load_off_the_shelf
from plugguide.models.saving import save_atomically, write_file_atomically
from plugguide.models.shift_guide import ShiftGuide, load_shift_guide
from plugguide.models.text_encoder import encode_prompts, is_text_conditional, load_text_encoder, prompt_conditioning

__all__ = [
    "AUTOCAST_DTYPES",
    "CLIPImageEmbedder",
    "DenseModel",
    "FullGuide",
    "Guide",
    "GridDDIMScheduler",
    "ImageEmbedder",
    "MultiExpertModel",
    "SCHEDULER_FAMILIES",
    "SUPPORTED_SCHEDULERS",
    "ShiftGuide",
    "TimmClassifier",
    "TinyGuide",
    "check_classifier_input",
    "compile_denoiser",
    "denoiser_autocast",
    "embed_images",
    "encode_prompts",
    "expert_boundaries",
    "is_text_conditional",
    "load_classifier",
    "load_clip_embedder",
    "load_dense_model",
    "load_guide",
    "load_image_embedder",
    "load_off_the_shelf",
    "load_scheduler",
    "sampler_on_grid",
    "load_shift_guide",
    "load_text_encoder",
    "load_unet",
    "load_vae",
    "parse_autocast_dtype",
    "predict_guided_noise",
    "prompt_conditioning",
    "save_atomically",
    "write_file_atomically",
]
