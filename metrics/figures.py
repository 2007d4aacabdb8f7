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
