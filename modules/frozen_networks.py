"""LightningModules that train one network beside frozen ones (a teacher, the diffusion model, the evaluator)."""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


class FrozenNetworksModule(L.LightningModule):
    """Keeps the networks named in `frozen_networks` frozen: eval mode, out of checkpoints, and said so once.

    - When `fit` sets up, everything else is put in train mode and they in eval mode, and they stay there whatever
      Lightning switches (BatchNorm statistics and dropout of a frozen teacher must not move while the
      student trains; the student's must).
    - Checkpoints leave them out: they are reloaded from their paths when the module is built, so a checkpoint
      of PPAP experts on ADM ImageNet-256 holds the experts, not 550M frozen UNet parameters.
    - When `fit` sets up, one line names them; Lightning's generic "Found N module(s) in eval mode" warning is then
      silenced for exactly that count, so it still speaks when any *other* module is in eval mode.

    Subclasses set `frozen_networks` to the attribute names (a None attribute is skipped) and call
    `super()` in the hooks they override.
    """

    frozen_networks: tuple[str, ...] = ()

    def frozen(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.frozen_networks if getattr(self, name, None) is not None}

    def train(self, mode: bool = True) -> "FrozenNetworksModule":
        super().train(mode)
        for network in self.frozen().values():
            network.eval()
        return self

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        # Lightning keeps each submodule's mode as it finds it, and networks loaded with `from_pretrained` come
        # in eval mode: without this the trained networks would train with frozen BatchNorm statistics.
        self.train()
        frozen = self.frozen()
        inside = {id(module) for network in frozen.values() for module in network.modules()}
        in_eval = [module for module in self.modules() if not module.training]
        if in_eval and all(id(module) in inside for module in in_eval):
            warnings.filterwarnings(
                "ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start of training"
            )
        described = ", ".join(
            f"{name} ({type(net).__name__}, {sum(p.numel() for p in net.parameters()):,} parameters)"
            for name, net in frozen.items()
        )
        rank_zero_info(f"Frozen, in eval mode and reloaded from their paths rather than checkpointed: {described}.")

    def _is_frozen_key(self, key: str) -> bool:
        return any(key.startswith(f"{name}.") for name in self.frozen())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not self._is_frozen_key(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        frozen_state = {k: v for k, v in self.state_dict().items() if self._is_frozen_key(k)}
        checkpoint["state_dict"] = {**frozen_state, **checkpoint["state_dict"]}
