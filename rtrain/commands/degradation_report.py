"""The degradation experiment's results from MLflow: a markdown table of final errors and Fig. 6-style curves.

Reads each run's metric histories (`train/top1_error`, logged once per epoch by the engine on the batches as
trained, and `val/top1_error`) from the tracking store, so the report shows what MLflow recorded. The figure
follows the paper's Fig. 6: training error dashed, validation error solid, one colour per net, epochs on x;
plain nets on the left, ResNets on the right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAIN_ERROR = "train/top1_error"
VAL_ERROR = "val/top1_error"
TABLE_NAME = "degradation.md"
FIGURE_NAME = "degradation.png"
NET_COLOURS = {"plain20": "tab:orange", "plain56": "tab:red", "resnet20": "tab:cyan", "resnet56": "tab:blue"}

Points = list[tuple[float, float]]  # (epoch, error in %)


class ReportError(RuntimeError):
    """The tracking store lacks what the report needs; the message names the run and the metric."""


@dataclass(frozen=True)
class Curves:
    net: str
    run_id: str
    train: Points
    val: Points

    @property
    def residual(self) -> bool:
        return self.net.startswith("resnet")

    @property
    def depth(self) -> int:
        return int(self.net.removeprefix("resnet").removeprefix("plain"))

    @property
    def label(self) -> str:
        return f"{'ResNet' if self.residual else 'plain'}-{self.depth}"


def _history(client: Any, run_id: str, key: str, steps_per_epoch: float) -> Points:
    metrics = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [(m.step / steps_per_epoch, 100.0 * m.value) for m in metrics]


def load_curves(tracking_uri: str, records: dict[str, dict[str, Any]]) -> list[Curves]:
    """Every net's error curves from its MLflow run (the run id and length come from the launcher's summary)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    curves = []
    for net, record in records.items():
        summary = record["summary"]
        # whole epochs end a finished run (train.epochs): steps / epochs; a run shorter than one epoch: its steps
        steps_per_epoch = summary["step"] / summary["epoch"] if summary.get("epoch") else summary["step"]
        curve = Curves(net, summary["run_id"], _history(client, summary["run_id"], TRAIN_ERROR, steps_per_epoch),
                       _history(client, summary["run_id"], VAL_ERROR, steps_per_epoch))
        if not curve.train or not curve.val:
            raise ReportError(f"MLflow run {curve.run_id} ({net}) in {tracking_uri} has no {TRAIN_ERROR} or "
                             f"{VAL_ERROR} history")
        curves.append(curve)
    return curves


def error_table(curves: list[Curves]) -> str:
    """Markdown: final training and validation error per net, then the paper's two comparisons."""
    lines = ["| net | layers | shortcuts | final training error | final validation error | epochs | MLflow run |",
             "|---|---|---|---|---|---|---|"]
    for c in curves:
        lines.append(f"| {c.label} | {c.depth} | {'A (identity)' if c.residual else 'none'} | {c.train[-1][1]:.2f} % "
                     f"| {c.val[-1][1]:.2f} % | {c.train[-1][0]:g} | `{c.run_id}` |")
    by_net = {c.net: c for c in curves}
    for shallow, deep, paper in (("plain20", "plain56", "higher: degradation"),
                                 ("resnet20", "resnet56", "lower: depth helps")):
        if shallow in by_net and deep in by_net:
            gap = by_net[deep].train[-1][1] - by_net[shallow].train[-1][1]
            lines.append(f"\n{by_net[deep].label} minus {by_net[shallow].label}, final training error: "
                         f"{gap:+.2f} points (the paper: {paper}).")
    return "\n".join(lines) + "\n"


def plot_error_curves(curves: list[Curves], path: Path) -> None:
    """Fig. 6's style: dashed training error, solid validation error, a colour per net; plain | ResNet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, residual, title in ((axes[0], False, "plain networks"), (axes[1], True, "ResNets (option A)")):
        for c in (c for c in curves if c.residual == residual):
            colour = NET_COLOURS.get(c.net)
            ax.plot(*zip(*c.train), linestyle="--", linewidth=1.2, color=colour, marker=".")
            ax.plot(*zip(*c.val), linestyle="-", linewidth=2.0, color=colour, marker=".", label=c.label)
        ax.set_title(title)
        ax.set_xlabel("epochs")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right")
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, _error_axis_top(curves))
    fig.suptitle("digits, dashed: training error, solid: validation error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _error_axis_top(curves: list[Curves]) -> float:
    """Like the paper's 0-20 % axis: room for every curve once past the warm start, early epochs may run off."""
    later = [e for c in curves for x, e in (*c.train, *c.val) if x >= 2.0 or x >= 0.5 * c.train[-1][0]]
    return min(100.0, max(5.0, 1.15 * max(later, default=100.0)))


def write_report(tracking_uri: str, experiment: str, records: dict[str, dict[str, Any]],
                 out: Path) -> tuple[Path, Path]:
    """degradation.md and degradation.png under `out`; returns their paths."""
    from rtrain._io import write_atomically

    curves = load_curves(tracking_uri, records)
    table = out / TABLE_NAME
    header = (f"# Degradation (He et al. 2015, Fig. 6) on digits\n\nMLflow experiment `{experiment}` in "
              f"`{tracking_uri}`.\n\n")
    write_atomically(table, header + error_table(curves))
    figure = out / FIGURE_NAME
    plot_error_curves(curves, figure)
    return table, figure
