"""Every figure the project draws (matplotlib, Agg backend): callbacks log them to TensorBoard, scripts save them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend
import torch  # noqa: E402


def calibration_figure(curves: dict[str, dict[str, list[float]]]):
    """ECE_t (left) and accuracy_t (right, dashed) against t, one colour per guide."""
    figure, (ece_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        label = f"{name} (integral ECE {curve['integral_ece'][0]:.3f})"
        ece_axis.plot(curve["timestep"], curve["ece"], label=label)
        accuracy_axis.plot(curve["timestep"], curve["accuracy"], "--", label=name)
    ece_axis.set(xlabel="timestep t", ylabel="ECE_t", title="Calibration error along the diffusion")
    accuracy_axis.set(xlabel="timestep t", ylabel="accuracy_t", title="Accuracy on the guide's input", ylim=(0, 1))
    ece_axis.legend(fontsize=7)
    accuracy_axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def render_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] of target or predicted maps, to sit beside samples in a grid.

    Label maps (integers) get one colour per class (matplotlib's tab20, class 0, the background, black); real-valued
    maps grey levels, the smallest value of the batch white and the largest black (strokes, at distance 0, white).
    """
    if maps.is_floating_point():
        low, high = maps.min(), maps.max()
        grey = 1 - (maps - low) / (high - low).clamp_min(1e-12)
        return grey.unsqueeze(1).expand(-1, 3, -1, -1).float()
    palette = torch.tensor(
        [(0.0, 0.0, 0.0)] + [matplotlib.colormaps["tab20"](i)[:3] for i in range(int(maps.max()))],
        dtype=torch.float32,
        device=maps.device,
    )
    return palette[maps.long()].permute(0, 3, 1, 2)


def sweep_figure(
    sweeps: dict[str, dict[str, dict]],
    unguided: dict,
    scales: list[float] | None,
    distance: str = "fid_autoencoder",
    score: str = "guided_accuracy",
):
    """A score (guided accuracy by default) against a quality distance for every row of a scale sweep (one line per
    row, one point per scale of `scales`, or of each row's own scales for None).

    The unguided model's 95% interval of the distance is shaded: the best-scale rule keeps a row's most accurate
    point left of its upper edge, so the plot shows what each row trades for accuracy.
    """
    figure, axis = plt.subplots(figsize=(8, 5))
    low, high = unguided["intervals"][distance]
    axis.axvspan(low, high, color="grey", alpha=0.2, label="unguided, 95% interval")
    for name, sweep in sweeps.items():
        shown = sorted((key for key in sweep if scales is None or float(key) in scales), key=float)
        points = [(sweep[key][distance], sweep[key][score]) for key in shown]
        axis.plot(*zip(*points), marker="o", label=name)
        for (x, y), key in zip(points, shown):
            axis.annotate(f"{float(key):g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ylabel = "guided accuracy (independent evaluator)" if score == "guided_accuracy" else score
    axis.set(
        xscale="log", xlabel=f"{distance} (lower is better)", ylabel=ylabel, ylim=(min(0, axis.get_ylim()[0]), 1.02)
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure
