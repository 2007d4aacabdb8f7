"""Prompt embeddings of text-conditional diffusion models, from the pipeline's own text encoder and tokenizer."""

from __future__ import annotations

import os

import torch
import transformers
from diffusers import UNet2DConditionModel
from torch import nn

from plugguide.models.diffusion_model import check_model_path

# Stable Diffusion pads prompts to CLIP's 77 tokens and DeepFloyd-IF pads its T5 prompts to the same 77.
MAX_PROMPT_TOKENS = 77


def is_text_conditional(unet: nn.Module) -> bool:
    """A `UNet2DConditionModel` without class embeddings: it is conditioned through cross-attention on text hidden states."""
    return (
        isinstance(unet, UNet2DConditionModel)
        and unet.config.num_class_embeds is None
        and unet.config.class_embed_type is None
    )


def load_text_encoder(path: str, setting: str = "diffusion_model") -> tuple[nn.Module, object]:
    """(text encoder, tokenizer) of a pipeline directory or hub id: `text_encoder/` (its class from its config's
    `architectures`, e.g. CLIPTextModel for Stable Diffusion, T5EncoderModel for DeepFloyd-IF) and `tokenizer/`."""
    check_model_path(path, setting)
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, "text_encoder")):
        raise FileNotFoundError(
            f"`{setting}`={path!r} holds a text-conditional UNet but no text_encoder/ to encode its prompt."
        )
    try:
        config = transformers.AutoConfig.from_pretrained(path, subfolder="text_encoder")
        encoder = getattr(transformers, config.architectures[0]).from_pretrained(path, subfolder="text_encoder")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    except OSError as error:
        raise OSError(
            f"`{setting}`={path!r}: its text encoder could not be loaded: hub ids need network access ({error})."
        ) from error
    return encoder.eval().requires_grad_(False), tokenizer


@torch.no_grad()
def encode_prompts(encoder: nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, L, D) last hidden states of `prompts`, padded to the tokenizer's length (at most 77), as the diffusers
    pipelines encode them; T5 encoders also get the attention mask, as DeepFloyd-IF's pipeline passes it."""
    length = min(tokenizer.model_max_length, MAX_PROMPT_TOKENS)
    tokens = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    masked = "T5" in type(encoder).__name__ or getattr(encoder.config, "use_attention_mask", False)
    mask = tokens.attention_mask.to(device) if masked else None
    return encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def prompt_conditioning(
    path: str, unet: nn.Module, prompt: str | None, setting: str = "prompt"
) -> dict[str, torch.Tensor]:
    """The `prompt_embeds` / `negative_prompt_embeds` a `GuidedDiffusionPipeline` needs for `unet`, encoded once.

    Text-conditional UNets sample under `prompt` (None: the empty prompt, which samples them unconditionally, as
    PPAP guides GLIDE); the negative is the empty prompt's embeddings, CFG's null condition. Other UNets need none.
    """
    if not is_text_conditional(unet):
        if prompt is not None:
            raise ValueError(
                f"`{setting}`={prompt!r} needs a text-conditional UNet (cross-attention), but the model's is {type(unet).__name__} without one."
            )
        return {}
    encoder, tokenizer = load_text_encoder(path)
    prompt_embeds, empty = encode_prompts(encoder, tokenizer, [prompt or "", ""]).chunk(2)
    return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": empty}
