"""The conv LoRA of loralib (Hu et al., 2021), which PPAP's authors use: an update of rank up to r k, as a peft layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Conv2d as PeftLoraConv2d
from torch import nn


class LoralibConv2d(PeftLoraConv2d):
    """LoRA on a k x k convolution as loralib's `ConvLoRA` and riiid/PPAP's `LoraConv2d` write it.

        Delta W = (alpha / r) reshape(B A, (out, in, k, k)),   A: (r k) x (in k),   B: (out k) x (r k)

    peft's own conv LoRA is a k x k convolution to r channels followed by a 1 x 1 convolution back (rank <= r, with
    (in k^2 + out) r parameters); this one factors the (out k) x (in k) matrix view of the kernel, so its update has
    rank up to r k in that view and (in + out) r k^2 parameters. A is Kaiming-uniform, B zero, so a new expert starts
    as the frozen model, as in both. Unmerged it convolves once with W + Delta W, as the authors' forward does.
    Registered through peft's custom-module mapping (`MultiExpertModel(conv_lora="loralib")`), so peft's adapter
    switching, merging and saving apply unchanged; the factors are held as the weights of two bias-free `nn.Linear`.

    Differences from the authors' layer: a per-expert LoRA bias is not offered (`lora_bias` is refused: the factored
    matrix has no place for one; their ResNet convs have no bias either), and only square kernels without groups are
    accepted, the ones their reshape is defined for.
    """

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
        base = self.get_base_layer()
        kernel = base.kernel_size
        if kernel[0] != kernel[1] or base.groups != 1:
            raise ValueError(
                f"`conv_lora`='loralib' adapts square, ungrouped convolutions, but a targeted layer has kernel {tuple(kernel)} "
                f"and groups={base.groups}; leave it out of `target_modules` or use `conv_lora`='peft'."
            )
        if config.lora_bias:
            raise ValueError(
                "`conv_lora`='loralib' has no per-expert LoRA bias; its targets must have no bias (as ResNet convs "
                "before BatchNorm), or use `conv_lora`='peft'."
            )
        if config.use_dora or config.lora_dropout:
            raise ValueError("`conv_lora`='loralib' is plain LoRA: no DoRA and no LoRA dropout.")
        k = kernel[0]
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.use_rslora[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features * k, r * k, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * k, self.out_features * k, bias=False)
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        delta = self.lora_B[adapter].weight @ self.lora_A[adapter].weight
        return delta.view(weight.shape) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        base = self.get_base_layer()
        active = [name for name in self.active_adapters if name in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            if self.disable_adapters and self.merged:
                self.unmerge()
            return base(x)
        weight = base.weight + sum(self.get_delta_weight(name) for name in active)
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
