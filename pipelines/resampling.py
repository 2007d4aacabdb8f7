"""Resampling a population of weighted particles: effective sample size, multinomial and systematic draws.

Particles come in groups, one group of K per requested sample (one target): log-weights are (B, K) and every draw
stays inside its group, so a particle only ever copies a particle of its own target. Both schemes draw K indices by
the inverse CDF of the normalised weights W at K points u in [0, 1), index i where `W_0 + ... + W_(i-1) < u <= W_0 +
... + W_i` (Chopin & Papaspiliopoulos, 2020, ch. 9, the `inverse_cdf` of TDS's `smc_utils`):

    multinomial   u_k ~ U(0, 1) independently             each index is drawn from W on its own
    systematic    u_k = (u + k) / K, one u ~ U(0, 1)      the K points evenly spaced: every particle with K W_i >= 1 is
                                                          kept floor(K W_i) times or more, with less variance

The uniforms come from one generator per group where a list is given, so a group's draws do not depend on the rest
of the batch (the project's per-sample seeds, `sample_batch`).
"""

from __future__ import annotations

from typing import Literal

import torch

ResamplingMethod = Literal["multinomial", "systematic"]
RESAMPLING_METHODS = ("multinomial", "systematic")


def normalized_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """W = softmax(log w) over the last dimension (each group's K particles), computed stably."""
    return torch.softmax(log_weights.double(), dim=-1).to(log_weights.dtype)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / sum_k W_k^2 per group (Kong et al., 1994): K for equal weights, 1 when one particle holds them all."""
    weights = normalized_weights(log_weights).double()
    return (1 / weights.pow(2).sum(-1)).to(log_weights.dtype)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Indices i with `W_0 + ... + W_(i-1) < u <= W_0 + ... + W_i` for each of `uniforms` (B, M), per group of
    `weights` (B, K) that sum to one; an index past the last particle (rounding in the cumulative sum) is the last."""
    cumulative = weights.double().cumsum(-1)
    indices = torch.searchsorted(cumulative, uniforms.double().contiguous(), right=False)
    return indices.clamp(max=weights.shape[-1] - 1)


def group_uniforms(
    method: ResamplingMethod,
    groups: int,
    size: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(groups, size) points in [0, 1) of `method`: independent uniforms, or one uniform spread evenly (systematic);
    drawn per group from `generator[b]` when it is a list, else from the one generator (or the global one)."""
    if method not in RESAMPLING_METHODS:
        raise ValueError(f"Expected `resampling` to be one of {', '.join(RESAMPLING_METHODS)}, but got {method!r}.")
    count = size if method == "multinomial" else 1
    if isinstance(generator, list):
        if len(generator) != groups:
            raise ValueError(f"Expected one generator per group ({groups}), but got {len(generator)}.")
        draws = torch.stack(
            [torch.rand(count, generator=g, device=g.device, dtype=torch.float64).cpu() for g in generator]
        )
    else:
        gen_device = generator.device if generator is not None else "cpu"
        draws = torch.rand(groups, count, generator=generator, device=gen_device, dtype=torch.float64).cpu()
    if method == "systematic":
        draws = (draws + torch.arange(size, dtype=torch.float64)) / size
    return draws.to(device)


def resample_indices(
    log_weights: torch.Tensor,
    method: ResamplingMethod = "systematic",
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """(B, K) indices, within each group, of the particles the resampled population copies."""
    groups, size = log_weights.shape
    uniforms = group_uniforms(method, groups, size, generator, log_weights.device)
    return inverse_cdf(normalized_weights(log_weights), uniforms)


def flat_indices(indices: torch.Tensor) -> torch.Tensor:
    """Indices into the flattened B * K particles (group b's particles at b K ... b K + K - 1) of per-group `indices`."""
    groups, size = indices.shape
    return (indices + size * torch.arange(groups, device=indices.device)[:, None]).flatten()
