"""Every figure the project draws (matplotlib, Agg backend): callbacks log them to TensorBoard, scripts save them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend


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


def sweep_figure(sweeps: dict[str, dict[str, dict]], unguided: dict, scales: list[float], distance: str = "fid_autoencoder"):
    """Guided accuracy against a quality distance for every row of a scale sweep (one line per row, one point per scale).

    The unguided model's 95% interval of the distance is shaded: the best-scale rule keeps a row's most accurate
    point left of its upper edge, so the plot shows what each row trades for accuracy.
    """
    figure, axis = plt.subplots(figsize=(8, 5))
    low, high = unguided["intervals"][distance]
    axis.axvspan(low, high, color="grey", alpha=0.2, label="unguided, 95% interval")
    for name, sweep in sweeps.items():
        points = [(sweep[str(s)][distance], sweep[str(s)]["guided_accuracy"]) for s in scales if str(s) in sweep]
        axis.plot(*zip(*points), marker="o", label=name)
        for (x, y), scale in zip(points, scales):
            axis.annotate(f"{scale:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    axis.set(xscale="log", xlabel=f"{distance} (lower is better)", ylabel="guided accuracy (independent evaluator)", ylim=(0, 1.02))
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure
