"""Figures in the paper's style (He et al. 2015): error curves (Figs. 4 and 6: training error dashed,
validation error solid, one colour per net) and layer responses (Fig. 7: std per layer, in order and sorted).

matplotlib's Agg backend only: no display needed, the same PNG everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

FIGURE_SIZE_IN = (8.0, 5.0)
LAYER_FIGURE_SIZE_IN = (8.0, 6.0)
DPI = 100  # 800 x 500 px curves, 800 x 600 px layer responses

Curve = Sequence[tuple[float, float]]  # (x, value)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def line_style(metric_key: str) -> str:
    """The paper's convention: training curves dashed, validation curves solid."""
    return "--" if metric_key.startswith("train/") else "-"


def curves_figure(runs: Mapping[str, Mapping[str, Curve]], path: Path, x_label: str, title: str = "") -> Path:
    """One colour per run (its label), one line per metric key of that run, dashed train/ and solid others."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGURE_SIZE_IN, dpi=DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, metrics) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        for key, points in metrics.items():
            if not points:
                continue
            xs, ys = zip(*points)
            scale = 100.0 if key.endswith("_error") else 1.0
            ax.plot(xs, [y * scale for y in ys], line_style(key), color=colour, linewidth=1.5,
                    label=f"{label} {key}")
    keys = sorted({k for metrics in runs.values() for k in metrics})
    ax.set_xlabel(x_label)
    ax.set_ylabel("error (%)" if keys and all(k.endswith("_error") for k in keys) else ", ".join(keys))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)


def layer_response_figure(series: Mapping[str, Sequence[float]], path: Path, title: str = "") -> Path:
    """Fig. 7: std of each residual function's output by layer index (top) and sorted in descending
    magnitude (bottom), one colour per net."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=LAYER_FIGURE_SIZE_IN, dpi=DPI)
    for label, stds in series.items():
        index = range(1, len(stds) + 1)
        top.plot(index, list(stds), "-o", markersize=3, linewidth=1.2, label=label)
        bottom.plot(index, sorted(stds, reverse=True), "-o", markersize=3, linewidth=1.2, label=label)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    if title:
        top.set_title(title)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
