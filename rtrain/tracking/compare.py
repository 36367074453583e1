"""`rtrain compare`: runs side by side from any MLflow store (sqlite file or server).

One row per run: its name, id, status, the recipe keys whose values differ between the runs, the final
and best value of each chosen metric, and (runs that logged it) goodput across attempts with its losses in
seconds (rtrain.tracking.goodput). The PNG shows the metrics' curves in the paper's style (training
dashed, validation solid, one colour per run, x in epochs when every run recorded its steps per epoch);
`--layer-responses` overlays the runs' latest layer responses (Fig. 7).
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtrain.tracking.run_info import RESPONSE_KEY, TAG_STEPS_PER_EPOCH

DEFAULT_URI = "sqlite:///out/demo/mlflow.db"  # where `make demo` tracks
DEFAULT_METRICS = ("top1_error",)
RUN_ID = re.compile(r"[0-9a-f]{32}")
RESPONSE_PREFIX = RESPONSE_KEY.split("{")[0]
IGNORED_PARAMS = ("run.name",)  # the row's name already says it


class CompareError(RuntimeError):
    """Nothing to compare, or a store, experiment or run that cannot be read; the message names it."""


class NoRunsError(CompareError):
    """No run matches the selection."""


@dataclass
class RunCurves:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    steps_per_epoch: int | None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)]
    latest: dict[str, float] = field(default_factory=dict)  # every metric's newest value (goodput, lost/...)

    def final(self, key: str) -> float | None:
        points = self.curves.get(key)
        return points[-1][1] if points else None

    def best(self, key: str) -> float | None:
        points = self.curves.get(key)
        if not points:
            return None
        values = [v for _, v in points]
        lower_is_better = key.endswith(("_error", "loss"))
        return min(values) if lower_is_better else max(values)


def default_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def open_store(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        path = path if path.is_absolute() else Path.cwd() / path
        if not path.is_file():
            raise CompareError(f"--tracking-uri {uri}: no such sqlite database ({path})")
        uri = f"sqlite:///{path}"
    return MlflowClient(tracking_uri=uri), uri


def metric_keys(metrics: list[str] | None) -> list[str]:
    """A bare name (top1_error) means its training and validation curves; train/x or val/x means that one."""
    keys: list[str] = []
    for name in metrics or DEFAULT_METRICS:
        for key in ([name] if "/" in name else [f"train/{name}", f"val/{name}"]):
            if key not in keys:
                keys.append(key)
    return keys


def _experiment_ids(client, uri: str, experiment: str | None) -> list[str]:
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise NoRunsError(f"no runs match: experiment {experiment!r} does not exist at {uri}")
    return [found.experiment_id]


def find_runs(client, uri: str, experiment: str | None, selection: list[str] | None) -> list[Any]:
    """The runs named (by id or run name) in `selection`, else every run of the experiment, oldest first."""
    from mlflow.exceptions import MlflowException

    ids = _experiment_ids(client, uri, experiment)
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    if not selection:
        runs = client.search_runs(ids, order_by=["attributes.start_time ASC"]) if ids else []
        if not runs:
            raise NoRunsError(f"no runs match: {where} at {uri} has no runs")
        return list(runs)
    chosen: list[Any] = []
    for wanted in selection:
        found = []
        if RUN_ID.fullmatch(wanted):
            try:
                found = [client.get_run(wanted)]
            except MlflowException:
                found = []
        if not found and ids:
            quoted = wanted.replace("'", "\\'")
            found = list(client.search_runs(ids, filter_string=f"attributes.run_name = '{quoted}'",
                                            order_by=["attributes.start_time ASC"]))
        if not found:
            raise NoRunsError(f"no runs match {wanted!r} in {where} at {uri}")
        chosen += [r for r in found if r.info.run_id not in {c.info.run_id for c in chosen}]
    return chosen


def load_curves(client, run: Any, keys: list[str]) -> RunCurves:
    tags = run.data.tags
    spe = tags.get(TAG_STEPS_PER_EPOCH)
    loaded = RunCurves(run.info.run_id, run.info.run_name or run.info.run_id[:8], run.info.status,
                       dict(run.data.params), int(spe) if spe and spe.isdigit() else None,
                       latest=dict(run.data.metrics))
    for key in keys:
        history = client.get_metric_history(run.info.run_id, key)
        loaded.curves[key] = sorted((int(m.step), float(m.value)) for m in history)
    return loaded


def differing_params(runs: list[RunCurves]) -> list[str]:
    keys = sorted({k for r in runs for k in r.params} - set(IGNORED_PARAMS))
    return [k for k in keys if len({r.params.get(k, "") for r in runs}) > 1]


def table_rows(runs: list[RunCurves], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    params = differing_params(runs)
    header = ["run", "run_id", "status", *params]
    for key in keys:
        header += [f"final {key}", f"best {key}"]
    goodput = any("goodput" in r.latest for r in runs)
    if goodput:
        header += ["goodput", *(f"{key} s" for key in GOODPUT_COLUMNS)]
    rows = []
    for r in runs:
        row = [r.name, r.run_id[:8], r.status, *(r.params.get(k, "") for k in params)]
        for key in keys:
            row += [_number(r.final(key)), _number(r.best(key))]
        if goodput:
            row += [_number(r.latest.get("goodput")), *(_seconds(r.latest.get(key)) for key in GOODPUT_COLUMNS)]
        rows.append(row)
    return header, rows


GOODPUT_COLUMNS = ("lost/restart", "lost/recomputed", "lost/startup", "lost/data_wait", "lost/checkpoint_blocking",
                   "lost/eval")


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return out.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [header, *rows]) + "\n"


def plot_curves(runs: list[RunCurves], keys: list[str], out: Path, x_axis: str = "auto") -> Path:
    """The chosen metrics of every run; x in epochs when asked or ("auto") when every run knows its epoch
    length, else in steps."""
    from rtrain.tracking.plots import curves_figure

    epochs = x_axis == "epochs" or (x_axis == "auto" and all(r.steps_per_epoch for r in runs))
    if epochs and not all(r.steps_per_epoch for r in runs):
        missing = [r.name for r in runs if not r.steps_per_epoch]
        raise CompareError(f"--x epochs: runs {', '.join(missing)} have no {TAG_STEPS_PER_EPOCH} tag; use --x steps")
    series = {}
    for r in runs:
        per = r.steps_per_epoch if epochs else 1
        series[_label(r, runs)] = {k: [(s / per, v) for s, v in r.curves.get(k, [])] for k in keys}
    if not any(points for metrics in series.values() for points in metrics.values()):
        raise CompareError(f"no values of {', '.join(keys)} in the chosen runs: nothing to plot")
    out.parent.mkdir(parents=True, exist_ok=True)
    return curves_figure(series, out, "epochs" if epochs else "steps")


def plot_layer_responses(client, runs: list[RunCurves], out: Path) -> Path:
    """Each run's layer responses at its latest measured step, overlaid (Fig. 7)."""
    from rtrain.tracking.plots import layer_response_figure

    series = {}
    for r in runs:
        latest = client.get_run(r.run_id).data._metric_objs
        blocks = sorted((m.key, m.value, m.step) for m in latest if m.key.startswith(RESPONSE_PREFIX))
        if not blocks:
            raise CompareError(f"run {r.name} ({r.run_id[:8]}) has no layer responses; "
                               "train it with analysis.layer_responses set")
        series[f"{_label(r, runs)} (step {max(step for _, _, step in blocks)})"] = [v for _, v, _ in blocks]
    out.parent.mkdir(parents=True, exist_ok=True)
    return layer_response_figure(series, out)


def _label(run: RunCurves, runs: list[RunCurves]) -> str:
    same_name = sum(r.name == run.name for r in runs) > 1
    return f"{run.name} ({run.run_id[:8]})" if same_name else run.name
