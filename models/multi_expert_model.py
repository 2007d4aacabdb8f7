"""N noise-range experts made from one off-the-shelf model, classifier or dense (PPAP, Go et al., 2023)."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from plugguide.models.classifier import TimmClassifier
from plugguide.models.dense_model import DenseModel
from plugguide.models.expert_biases import ExpertBias
from plugguide.models.loralib_conv import LoralibConv2d
from plugguide.models.off_the_shelf import load_off_the_shelf
from plugguide.models.saving import read_saved_config, save_atomically

Finetune = Literal["lora", "full"]
ConvLora = Literal["peft", "loralib"]

# LoRA targets of the authors' code (riiid/PPAP): ResNet stem conv and conv1/conv2 of every block
# (not conv3, not the downsample convs); ViT/DeiT attention qkv and proj. Dense models, keyed by the library's class,
# follow their MiDaS adapter (`peft/midas_adapter.py`: the encoder's convs and the decoder's fusion convs): the same
# ResNet rule on a timm encoder plus the decoder's convs (smp Unet); ResNet rule plus the ASPP convs (torchvision
# DeepLabV3, undilated convs only: peft's LoRA ignores a conv's dilation, huggingface/peft#3697); ViT attention plus the
# fusion blocks' residual convs (transformers DPT, MiDaS v3).
DEFAULT_LORA_TARGETS = {
    "ResNet": r"model\.(conv1|layer\d+\.\d+\.conv[12])",
    "VisionTransformer": r"model\.blocks\.\d+\.attn\.(qkv|proj)",
    "Unet": r"model\.(encoder\.model\.(conv1|layer\d+\.\d+\.conv[12])|decoder\.blocks\.\d+\.conv[12]\.0)",
    "DeepLabV3": r"model\.(backbone\.(conv1|layer[12]\.\d+\.conv[12]|layer[34]\.\d+\.conv1)|classifier\.(0\.(convs\.0\.0|convs\.4\.1|project\.0)|1))",
    "DPTForDepthEstimation": r"model\.(dpt\.encoder\.layer\.\d+\.attention\.(attention\.(query|key|value)|output\.dense)|neck\.fusion_stage\.layers\.\d+\.residual_layer[12]\.convolution[12])",
}
EXPERT_BIASES = "expert_biases.safetensors"  # per_expert_biases: an expert's bias deltas, beside its peft adapter
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def expert_boundaries(num_experts: int, num_train_timesteps: int) -> list[int]:
    """[n T / N for n in 0..N], rounded: expert n covers timesteps [b_n, b_{n+1}).

    The authors' code floors n T / N: the same boundaries whenever N divides T, one timestep apart otherwise.

    Args:
        num_experts (`int`): N, between 1 and T.
        num_train_timesteps (`int`): T of the diffusion model.
    """
    if not 1 <= num_experts <= num_train_timesteps:
        raise ValueError(f"Expected `num_experts` to be between 1 and T={num_train_timesteps}, but got {num_experts}.")
    return [round(n * num_train_timesteps / num_experts) for n in range(num_experts + 1)]


def check_boundaries(boundaries: list[int], num_train_timesteps: int) -> list[int]:
    """Validates custom expert ranges: strictly increasing from 0 to T, so they cover [0, T) exactly once."""
    if (
        len(boundaries) < 2
        or boundaries[0] != 0
        or boundaries[-1] != num_train_timesteps
        or any(b <= a for a, b in zip(boundaries, boundaries[1:]))
    ):
        raise ValueError(
            f"`timestep_boundaries`={boundaries} must rise strictly from 0 to T={num_train_timesteps}, so that the "
            "expert ranges [b_n, b_{n+1}) cover [0, T) without gaps or overlaps."
        )
    return list(boundaries)


class MultiExpertModel(nn.Module):
    """One frozen off-the-shelf model and N experts, expert n guiding timesteps [b_n, b_{n+1}) (PPAP, Go et al., 2023).

    The model is a classifier (`TimmClassifier`) or a dense model (`DenseModel`); the experts return what it returns
    (class logits, per-pixel logits, maps), so every task (`pipelines.tasks`) shares this one wrapper.

    PPAP's parameter-efficient experts (`finetune="lora"`): per expert a peft LoRA adapter on the chosen weights
    (W + (alpha / r) B A, with its own LoRA bias where every targeted layer has one), its own copy of every
    normalisation layer (affine weights and BatchNorm running statistics, which noise shifts) and, with
    `per_expert_head`, of the head (a dense model's per-pixel output layer). Switching experts switches these small
    sets (peft `set_adapter`); the backbone is never reloaded. `finetune="full"` gives the paper's "multi-experts"
    rows: N full trainable copies. A timestep on a boundary b_n goes to the upper expert, the one trained on it.

    Where this departs from the authors' code (riiid/PPAP; measured in docs/methods.md): convolutions take peft's
    LoRA (rank <= r) unless `conv_lora="loralib"` (theirs, rank up to r k); a ViT/DeiT expert owns the biases of its
    LoRA layers, norms and head, and all others only with `per_expert_biases` (theirs); the head is per expert unless
    `per_expert_head=False` (theirs); the update is always scaled by alpha / r, where their unmerged `LoRALinear`
    leaves it out (the same at their alpha = r).

    Args:
        backbone (`TimmClassifier` or `DenseModel`): the off-the-shelf model; the experts wrap a frozen copy of it.
        num_experts (`int`, defaults to 5): N; the experts split [0, T) into equal ranges unless
            `timestep_boundaries` is given.
        num_train_timesteps (`int`, defaults to 1000): T of the diffusion model.
        finetune (`str`, defaults to `"lora"`): "lora" (parameter-efficient, PPAP) or "full" (one copy per expert).
        lora_rank (`int`, defaults to 16): LoRA rank r.
        lora_alpha (`float`, defaults to 8.0): LoRA alpha (the update is scaled by alpha / r).
        target_modules (`str` or `list[str]`, *optional*): regex or module names for LoRA; None: the model family's
            default (`DEFAULT_LORA_TARGETS`).
        timestep_boundaries (`list[int]`, *optional*): custom ranges b_0 = 0 < b_1 < ... < b_N = T.
        per_expert_head (`bool`, defaults to `True`): each LoRA expert owns a copy of the head, or (False, the
            authors' choice) all share the frozen one.
        conv_lora (`str`, defaults to `"peft"`): the form of LoRA on convolutions: "peft" (a k x k conv to r
            channels, then 1 x 1 back: rank <= r) or "loralib" (`LoralibConv2d`, the authors' form: rank up to r k).
        per_expert_biases (`bool`, defaults to `False`): each LoRA expert also owns every bias of the model that its
            LoRA biases, norms and head do not already hold (`ExpertBias`), as the authors' ViT/DeiT adapters train
            every bias (a ResNet's convs have none, so there it changes nothing).
    """

    def __init__(
        self,
        backbone: TimmClassifier | DenseModel,
        num_experts: int = 5,
        num_train_timesteps: int = 1000,
        finetune: Finetune = "lora",
        lora_rank: int = 16,
        lora_alpha: float = 8.0,
        target_modules: str | list[str] | None = None,
        timestep_boundaries: list[int] | None = None,
        per_expert_head: bool = True,
        conv_lora: ConvLora = "peft",
        per_expert_biases: bool = False,
    ) -> None:
        super().__init__()
        if finetune not in ("lora", "full"):
            raise ValueError(f"Expected `finetune` to be 'lora' or 'full', but got {finetune!r}.")
        if conv_lora not in ("peft", "loralib"):
            raise ValueError(f"Expected `conv_lora` to be 'peft' or 'loralib', but got {conv_lora!r}.")
        if finetune == "full" and per_expert_biases:
            raise ValueError(
                "`per_expert_biases` adds biases to LoRA experts; `finetune`='full' trains every bias already."
            )
        if lora_rank < 1:
            raise ValueError(f"Expected `lora_rank` to be >= 1, but got {lora_rank}.")
        if timestep_boundaries is None:
            boundaries = expert_boundaries(num_experts, num_train_timesteps)
        else:
            boundaries = check_boundaries(timestep_boundaries, num_train_timesteps)
            num_experts = len(boundaries) - 1
        self.num_experts = num_experts
        self.num_classes = backbone.num_classes
        self.predicts = backbone.predicts
        self.in_chans = getattr(backbone, "in_chans", None)
        self.finetune = finetune
        self.backbone_parameters = sum(p.numel() for p in backbone.parameters())
        self.backbone_class = type(backbone)
        self.backbone_config = dict(backbone._hub_mixin_config)
        self.register_buffer("boundaries", torch.tensor(boundaries), persistent=False)
        self.config = dict(
            num_experts=num_experts,
            num_train_timesteps=num_train_timesteps,
            finetune=finetune,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            target_modules=target_modules,
            timestep_boundaries=boundaries,
            per_expert_head=per_expert_head,
            conv_lora=conv_lora,
            per_expert_biases=per_expert_biases,
        )
        # peft wraps layers in place: the experts wrap a frozen copy, never the caller's model.
        backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.expert_biases = nn.ModuleDict()
        if finetune == "full":
            self.experts = nn.ModuleList(copy.deepcopy(backbone).requires_grad_(True) for _ in range(num_experts))
        else:
            targets, targeted = self.lora_targets(backbone, target_modules)
            lora_config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha,
                target_modules=targets,
                modules_to_save=self.per_expert_modules(backbone, per_expert_head),
                # A LoRA bias is a per-expert bias of its layer; a layer without a bias (ResNet convs, followed by
                # BatchNorm, whose per-expert copy holds the bias) gets none, as in the authors' adapters.
                lora_bias=all(module.bias is not None for module in targeted),
            )
            if conv_lora == "loralib":
                lora_config._register_custom_module({nn.Conv2d: LoralibConv2d})
            shared_biases = self.shared_biases(backbone, targeted, lora_config) if per_expert_biases else {}
            self.expert_biases = nn.ModuleDict(
                {name.replace(".", "-"): ExpertBias(module, num_experts) for name, module in shared_biases.items()}
            )
            self.peft_model = get_peft_model(backbone, lora_config, adapter_name=self.expert_name(0))
            for n in range(1, num_experts):
                self.peft_model.add_adapter(self.expert_name(n), lora_config)
            self.adapter_parameters = [
                p for key, p in self.peft_model.named_parameters() if "lora_" in key or ".modules_to_save." in key
            ] + list(self.expert_biases.parameters())
        self.active_expert = -1
        self.merges_adapters = False
        self.merged_expert: int | None = None  # the expert whose LoRA update is in the frozen weights now
        self.set_expert(0)

    @staticmethod
    def expert_name(n: int) -> str:
        return f"expert_{n}"

    @staticmethod
    def lora_targets(
        backbone: TimmClassifier | DenseModel, target_modules: str | list[str] | None
    ) -> tuple[str | list[str], list[nn.Module]]:
        """The LoRA targets (given, or the default of the backbone's family) and the layers they match, at least one."""
        layers = {
            name: module for name, module in backbone.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))
        }
        names = list(layers)
        if target_modules is None:
            family = type(backbone.model).__name__
            if family not in DEFAULT_LORA_TARGETS:
                raise ValueError(
                    f"No default LoRA `target_modules` for a {family}; set them (a regex or a list of names). "
                    f"Candidates: {names[:12]}{' ...' if len(names) > 12 else ''}"
                )
            target_modules = DEFAULT_LORA_TARGETS[family]
        if isinstance(target_modules, str):
            matched = [name for name in names if re.fullmatch(target_modules, name)]
        else:
            matched = [name for name in names if any(name == t or name.endswith("." + t) for t in target_modules)]
        if not matched:
            raise ValueError(
                f"LoRA `target_modules`={target_modules!r} matches no Conv2d/Linear layer of the off-the-shelf model. "
                f"Candidates: {names[:12]}{' ...' if len(names) > 12 else ''}"
            )
        # peft builds a conv's LoRA branch without its dilation (huggingface/peft#3697): the branch's output has another size.
        dilated = [
            name
            for name in matched
            if max(getattr(layers[name], "dilation", (1,))) > 1 and max(layers[name].kernel_size) > 1
        ]
        if dilated:
            raise ValueError(
                f"LoRA `target_modules`={target_modules!r} matches dilated convolutions {dilated[:6]}, which peft's LoRA cannot adapt (it drops their dilation); leave them out."
            )
        return target_modules, [layers[name] for name in matched]

    @staticmethod
    def shared_biases(
        backbone: TimmClassifier | DenseModel, targeted: list[nn.Module], lora_config: LoraConfig
    ) -> dict[str, nn.Module]:
        """The Linear/conv layers with a bias that no expert part holds yet: not inside a per-expert module (norms,
        head), and not a LoRA target whose per-expert LoRA bias already shifts it."""
        owned = tuple(lora_config.modules_to_save)
        lora_biased = targeted if lora_config.lora_bias else []
        return {
            name: module
            for name, module in backbone.named_modules()
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
            and module.bias is not None
            and not any(name == o or name.startswith(o + ".") for o in owned)
            and not any(module is t for t in lora_biased)
        }

    @staticmethod
    def per_expert_modules(backbone: TimmClassifier | DenseModel, head: bool = True) -> list[str]:
        """Modules each expert owns a full copy of: every normalisation layer and, if `head`, the model's output head."""
        output_head = backbone.output_head() if head else None
        return [
            name
            for name, module in backbone.named_modules()
            if isinstance(module, NORM_TYPES) or (module is output_head and name)
        ]

    def merge_adapters(self, merged: bool = True) -> "MultiExpertModel":
        """Runs each LoRA expert with its update merged into the frozen weights (`W + (alpha / r) B A`), or unmerged.

        Unmerged, every call of a LoRA layer also runs its low-rank branch; merged, an expert costs what the
        off-the-shelf model costs. Sampling switches experts a few times a run (once per noise range), so merging
        the new expert's adapters at each switch (peft's `merge_adapter`, after `unmerge_adapter` of the last one)
        is cheap. For sampling only: merged weights take no gradient to the adapters, so training stays unmerged.
        Merge and unmerge add and subtract the same update, which returns the weights to within float rounding.

        peft merges in place (`weight.data += delta`), which autograd does not see: a backward pass reads the weights
        as they are when it runs. A call whose batch spans several noise ranges with gradients enabled therefore runs
        unmerged (`forward`), and a later single-range call merges again.
        """
        self.merges_adapters = merged
        self._hold_merged(merged)
        return self

    def _hold_merged(self, merged: bool) -> None:
        """Puts the active expert's LoRA update into the frozen weights (`merged`) or takes the one there out."""
        if self.finetune != "lora":
            return
        if self.merged_expert is not None and (not merged or self.merged_expert != self.active_expert):
            self.peft_model.unmerge_adapter()
            self.merged_expert = None
        if merged and self.merged_expert is None:
            self.peft_model.merge_adapter([self.expert_name(self.active_expert)])
            self.merged_expert = self.active_expert

    def set_expert(self, n: int) -> None:
        """Makes expert n the one that runs (and, when training, the one whose parameters train)."""
        if not 0 <= n < self.num_experts:
            raise ValueError(f"Expected an expert index in [0, {self.num_experts}), but got {n}.")
        if n != self.active_expert and self.finetune == "lora":
            self._hold_merged(False)
            self.peft_model.set_adapter(self.expert_name(n))
            # peft freezes inactive adapters; keep every expert trainable instead, so that DDP (which
            # registers the parameters that require grad when it wraps the model) syncs all of them.
            # An inactive expert is simply not in the graph and gets no gradient.
            for parameter in self.adapter_parameters:
                parameter.requires_grad_(True)
            for bias in self.expert_biases.values():
                bias.active = n
        self.active_expert = n

    def expert_index(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The expert whose range [b_n, b_{n+1}) holds each timestep."""
        return torch.bucketize(timesteps.to(self.boundaries.device), self.boundaries[1:], right=True).clamp(
            max=self.num_experts - 1
        )

    def expert_module(self, n: int, merged: bool | None = None) -> nn.Module:
        """Expert n, ready to run: merged or not as `merged` says (None: as `merge_adapters` set)."""
        self.set_expert(n)
        self._hold_merged(self.merges_adapters if merged is None else merged)
        return self.experts[n] if self.finetune == "full" else self.peft_model

    def forward(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The model's output (logits, per-pixel logits, maps), each sample seen by the expert of its timestep (one
        expert runs per distinct range).

        A batch that spans several ranges runs unmerged while gradients are enabled: each part's backward must read
        its own expert's weights, and in-place merging would leave the last expert's there for all of them.
        """
        timesteps = timesteps.expand(images.shape[0]) if timesteps.dim() == 0 else timesteps
        index = self.expert_index(timesteps)
        experts = index.unique().tolist()
        if len(experts) == 1:
            return self.expert_module(experts[0])(images)
        merged = self.merges_adapters and not torch.is_grad_enabled()
        masks = [index == n for n in experts]
        parts = [self.expert_module(n, merged)(images[mask]) for n, mask in zip(experts, masks)]
        outputs = parts[0].new_empty(images.shape[0], *parts[0].shape[1:])
        for mask, part in zip(masks, parts):
            outputs[mask] = part
        return outputs

    def copy_expert(self, source: int, target: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Makes expert `target` a copy of expert `source` (parameters and BatchNorm statistics).

        Returns the (source, target) parameter pairs, so a caller can carry optimiser state across as well.
        """
        if self.finetune == "full":
            self.experts[target].load_state_dict(self.experts[source].state_dict())
            return list(zip(self.experts[source].parameters(), self.experts[target].parameters()))
        src, dst = f".{self.expert_name(source)}", f".{self.expert_name(target)}"
        tensors = dict(self.peft_model.named_parameters()) | dict(self.peft_model.named_buffers())
        pairs = [(bias.deltas[source], bias.deltas[target]) for bias in self.expert_biases.values()]
        with torch.no_grad():
            for parameter, twin in pairs:
                twin.copy_(parameter)
            for key, tensor in tensors.items():
                if f"{src}." in key or key.endswith(src):
                    twin = tensors[key.replace(f"{src}.", f"{dst}.") if f"{src}." in key else key[: -len(src)] + dst]
                    twin.copy_(tensor)
                    if isinstance(tensor, nn.Parameter):
                        pairs.append((tensor, twin))
        return pairs

    def expert_parameters(self, n: int) -> list[nn.Parameter]:
        """The parameters that expert n trains."""
        if self.finetune == "full":
            return list(self.experts[n].parameters())
        name = self.expert_name(n)
        adapters = [
            p for key, p in self.peft_model.named_parameters() if f".{name}." in key or key.endswith(f".{name}")
        ]
        return adapters + [bias.deltas[n] for bias in self.expert_biases.values()]

    def parameter_report(self) -> dict[str, float]:
        """Trainable parameters, absolute and as % of the backbone, as the PPAP paper reports them."""
        per_expert = sum(p.numel() for p in self.expert_parameters(0))
        total = per_expert * self.num_experts
        return {
            "backbone_parameters": self.backbone_parameters,
            "trainable_per_expert": per_expert,
            "trainable_total": total,
            "trainable_percent_of_backbone": 100.0 * total / self.backbone_parameters,
        }

    def save_pretrained(self, directory: str) -> None:
        """experts.json (ranges, settings), backbone/ (the off-the-shelf model) and one peft adapter directory per expert."""

        def save(tmp: str) -> None:
            os.makedirs(tmp)
            with open(os.path.join(tmp, "experts.json"), "w") as file:
                json.dump(self.config, file, indent=2)
            if self.finetune == "full":
                for n, expert in enumerate(self.experts):
                    expert.save_pretrained(os.path.join(tmp, self.expert_name(n)))
                self.experts[0].save_pretrained(os.path.join(tmp, "backbone"))
            else:
                with warnings.catch_warnings():
                    # peft takes any 1-D lora_B tensor for an ungathered ZeRO-3/FSDP shard; ours are the
                    # per-expert LoRA biases (lora_bias=True), saved whole.
                    warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape.*lora_B\.bias")
                    self.peft_model.save_pretrained(
                        tmp, selected_adapters=[self.expert_name(n) for n in range(self.num_experts)]
                    )
                for n in range(self.num_experts if self.expert_biases else 0):
                    biases = {key: bias.deltas[n].detach().contiguous() for key, bias in self.expert_biases.items()}
                    save_file(biases, os.path.join(tmp, self.expert_name(n), EXPERT_BIASES))
                self.frozen_backbone().save_pretrained(os.path.join(tmp, "backbone"))

        save_atomically(directory, save)

    def frozen_backbone(self) -> TimmClassifier | DenseModel:
        """A clean copy of the off-the-shelf model, without adapters (peft wraps layers in place)."""
        state = {}
        for key, value in self.peft_model.get_base_model().state_dict().items():
            if "lora_" in key or ".modules_to_save." in key:
                continue
            state[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
        backbone = self.backbone_class(**self.backbone_config)
        backbone.load_state_dict(state)
        return backbone

    @classmethod
    def from_pretrained(cls, directory: str, setting: str = "experts") -> "MultiExpertModel":
        """Loads experts saved by `save_pretrained`, without Lightning; errors name `setting`, the path and the missing part."""
        config = read_saved_config(directory, "experts.json", setting, "MultiExpertModel.save_pretrained")
        parts = ["backbone"] + [cls.expert_name(n) for n in range(len(config["timestep_boundaries"]) - 1)]
        missing = [part for part in parts if not os.path.isdir(os.path.join(directory, part))]
        if missing:
            raise FileNotFoundError(
                f"`{setting}`={directory!r} lacks {', '.join(f'{part}/' for part in missing)}: experts.json lists {len(parts) - 1} experts "
                "and a backbone, each saved in its own folder (was the directory copied in part?)."
            )
        backbone = load_off_the_shelf(os.path.join(directory, "backbone"), setting)
        experts = cls(backbone, **config)
        for n in range(experts.num_experts):
            path = os.path.join(directory, cls.expert_name(n))
            try:
                if config["finetune"] == "full":
                    experts.experts[n].load_state_dict(type(backbone).from_pretrained(path, strict=True).state_dict())
                else:
                    experts.peft_model.load_adapter(path, adapter_name=cls.expert_name(n))
                    if experts.expert_biases:
                        biases = load_file(os.path.join(path, EXPERT_BIASES))
                        with torch.no_grad():
                            for key, bias in experts.expert_biases.items():
                                bias.deltas[n].copy_(biases[key])
            except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
                raise OSError(
                    f"`{setting}`={directory!r}: expert {n} ({path}) could not be loaded, its files are damaged or truncated ({type(error).__name__}: {error})."
                ) from error
        experts.set_expert(0)
        return experts.eval()
