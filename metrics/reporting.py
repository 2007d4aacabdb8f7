"""How every results table reports a row: estimates with intervals, and the rule that picks a guided row's scale."""

from __future__ import annotations

import math

# The distance the scale rule and the tables lead with: FID in the autoencoder's latent space, which sees what
# a classifier's features ignore (stroke width, blobs, collapse onto one prototype per class).
PRIMARY_DISTANCE = "fid_autoencoder"

BEST_SCALE_RULE = (
    "best scale = the highest guided accuracy among the swept scales whose FID (autoencoder features) is not above "
    "the upper end of the unguided model's 95% interval; if no scale qualifies, the scale with the lowest such FID (marked *)"
)


def best_scale(
    sweep: dict[str, dict], unguided: dict, distance: str = PRIMARY_DISTANCE, score: str = "guided_accuracy"
) -> tuple[str, bool]:
    """(scale key, whether it met the quality bound) for one guided row's sweep, by `BEST_SCALE_RULE`.

    Accuracy alone would pick a scale that sharpens every sample into its class prototype; the bound keeps the
    sample quality no worse than unguided sampling's, by a distance the evaluator cannot be fooled on. Dense
    guidance is ranked by its map score (`score`: mIoU, or depth-map correlation) under the same bound.

    Args:
        sweep (`dict[str, dict]`): scale (as a string key) -> results with `score`, `distance` and `intervals`.
        unguided (`dict`): the unguided row's results, with `intervals[distance]`.
        distance (`str`, defaults to `PRIMARY_DISTANCE`): the quality distance the bound is taken on.
        score (`str`, defaults to `"guided_accuracy"`): what the best scale maximises (higher is better).
    """
    bound = unguided["intervals"][distance][1]
    admissible = {scale: r for scale, r in sweep.items() if r[distance] <= bound}
    if admissible:
        return max(admissible, key=lambda scale: (admissible[scale][score], -admissible[scale][distance])), True
    return min(sweep, key=lambda scale: sweep[scale][distance]), False


def estimate(results: dict, key: str, digits: int = 2, scale: float = 1.0) -> str:
    """`value [low, high]` of a result with its 95% interval (just `value` when it has none)."""
    value = results.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    interval = results.get("intervals", {}).get(key)
    text = f"{value * scale:.{digits}f}"
    if interval is not None:
        text += f" [{interval[0] * scale:.{digits}f}, {interval[1] * scale:.{digits}f}]"
    return text


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
