"""`rtrain compare`: a table of runs (differing recipe keys, final/best metrics) and PNGs of their curves."""

from __future__ import annotations

import argparse
from pathlib import Path

from rtrain.tracking import compare


def layer_response_path(out: str | None) -> Path:
    if out is None:
        return Path("layer-responses.png")
    path = Path(out)
    return path.with_name(f"{path.stem}-layer-responses{path.suffix or '.png'}")


def run(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    uri = args.tracking_uri or compare.default_uri()
    keys = compare.metric_keys(args.metrics)
    try:
        client, uri = compare.open_store(uri)
        found = compare.find_runs(client, uri, args.experiment, args.runs)
    except MlflowException as exc:  # a store MLflow refuses or cannot read: one line, not its traceback
        first = next((line for line in str(exc.message).splitlines() if line.strip()), type(exc).__name__)
        raise compare.CompareError(f"--tracking-uri {uri}: {first.split('. ')[0]}") from None
    runs = [compare.load_curves(client, r, keys) for r in found]
    header, rows = compare.table_rows(runs, keys)
    print(compare.render(header, rows, args.format), end="")
    if args.out:
        path = compare.plot_curves(runs, keys, Path(args.out), args.x_axis)
        print(f"wrote {path}")
    if args.layer_responses:
        path = compare.plot_layer_responses(client, runs, layer_response_path(args.out))
        print(f"wrote {path}")
    return 0
