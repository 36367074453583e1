"""`rtrain` console script: launch | validate | models | bench | eval | export | compare | reproduce

Each subcommand parses its own arguments and imports its implementation lazily, so `rtrain models`
does not pay for Ray or MLflow imports. `eval` and `export` (rtrain.commands) end an expected failure
(a missing or damaged checkpoint, missing data, a model without a torchvision layout) with one
`rtrain: ...` line on stderr and exit code 2; so does `reproduce` (runs the paper's degradation experiment
through real launches). `compare` does the same for a store, experiment or metric it cannot read, and exits 1
(one line) when no run matches. `bench` measures a recipe's loader and training step on this machine and names
the bottleneck; a recipe or data problem ends it with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_models(args: argparse.Namespace) -> int:
    from rtrain.models.profile import model_rows

    rows = model_rows()
    if args.format == "csv":
        print("name,params,macs,input_size")
        for r in rows:
            print(f"{r['name']},{r['params']},{r['macs']},{r['input_size']}")
        return 0
    print(f"{'model':<18} {'params':>14} {'mult-adds':>16} {'input':>6}")
    for r in rows:
        print(f"{r['name']:<18} {r['params']:>14,} {r['macs']:>16,} {r['input_size']:>6}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from rtrain.config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if not args.schema_only:
            from rtrain.launch.preflight import PreflightError, preflight
            from rtrain.launch.recipe import prepare_recipe

            preflight(prepare_recipe(recipe))
    except RecipeError as exc:
        print(exc, file=sys.stderr)
        return 2
    except PreflightError as exc:
        print("\n".join(f"rtrain: {line}" for line in exc.problems), file=sys.stderr)
        return 2
    print(recipe.to_yaml(), end="")
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from rtrain.launch import main as launch_main

    return launch_main([args.recipe, *args.overrides])


def _run_checkpoint_command(run, args: argparse.Namespace) -> int:
    from rtrain.checkpoint import CheckpointError
    from rtrain.commands.checkpoint_source import CommandError
    from rtrain.config import RecipeError
    from rtrain.data import DecodeError, SampleError, ShardError

    try:
        return run(args)
    except (CommandError, CheckpointError, RecipeError, ShardError, SampleError, DecodeError, OSError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception held
        print(f"rtrain: {message}", file=sys.stderr)
        return 2


def _cmd_eval(args: argparse.Namespace) -> int:
    from rtrain.commands import evaluate_checkpoint

    return _run_checkpoint_command(evaluate_checkpoint.run, args)


def _cmd_export(args: argparse.Namespace) -> int:
    from rtrain.commands import export_checkpoint

    return _run_checkpoint_command(export_checkpoint.run, args)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from rtrain.commands import degradation_report, reproduce

    try:
        return reproduce.run(args)
    except (reproduce.ReproduceError, degradation_report.ReportError, OSError) as exc:
        message = " ".join(str(exc).split())
        print(f"rtrain: {message}", file=sys.stderr)
        return 2


def _cmd_bench(args: argparse.Namespace) -> int:
    from rtrain.commands import bench
    from rtrain.config import RecipeError
    from rtrain.data import DecodeError, SampleError, ShardError

    try:
        return bench.run(args)
    except (bench.BenchError, RecipeError, ShardError, SampleError, DecodeError, OSError) as exc:
        print(f"rtrain: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _cmd_compare(args: argparse.Namespace) -> int:
    from rtrain.commands import compare_runs
    from rtrain.tracking.compare import CompareError, NoRunsError

    try:
        return compare_runs.run(args)
    except NoRunsError as exc:
        print(f"rtrain: {exc}", file=sys.stderr)
        return 1
    except (CompareError, OSError) as exc:
        print(f"rtrain: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _cmd_status(args: argparse.Namespace) -> int:
    import time

    from rtrain.tracking.status import StatusError, read_status, render

    try:
        while True:
            status = read_status(args.run_dir)
            if args.watch:
                print("\x1b[2J\x1b[H", end="")
            print(render(status), end="", flush=True)
            if not args.watch or status.state != "running":
                return 0
            time.sleep(args.watch)
    except StatusError as exc:
        print(f"rtrain: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _add_checkpoint_commands(sub: argparse._SubParsersAction) -> None:
    from rtrain.commands.arguments import (  # imports no torch
        add_bench_arguments,
        add_compare_arguments,
        add_eval_arguments,
        add_export_arguments,
        add_reproduce_arguments,
    )

    p = sub.add_parser("bench", help="a recipe's loader img/s and training step img/s on this machine, and which "
                       "one is the bottleneck")
    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("eval", help="top-1/top-5 error of a checkpoint on the val split (center, 10-crop, "
                       "multi-scale)")
    add_eval_arguments(p)
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("export", help="a checkpoint's weights as a torchvision state dict")
    add_export_arguments(p)
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("reproduce", help="reproduce a finding of the paper with real runs: degradation "
                       "(plain vs ResNet 20/56 on digits; table + Fig. 6-style curves)")
    add_reproduce_arguments(p)
    p.set_defaults(func=_cmd_reproduce)
    p = sub.add_parser("compare", help="MLflow runs side by side: differing recipe keys, final/best metrics, "
                       "a PNG of their curves in the paper's style")
    add_compare_arguments(p)
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("status", help="a run at a glance, live or ended: state, step and ETA, attempts, goodput, "
                       "newest checkpoint, slowest rank, MLflow run (read-only)")
    p.add_argument("run_dir", help="the run directory (run.output_root/run.name)")
    p.add_argument("--watch", type=float, nargs="?", const=5.0, default=0.0, metavar="SECONDS",
                   help="redraw every SECONDS (5) until the run is no longer running")
    p.set_defaults(func=_cmd_status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtrain", description="Distributed ResNet training.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models with parameters and multiply-adds")
    p.add_argument("--format", choices=("table", "csv"), default="table")
    p.set_defaults(func=_cmd_models)

    for name, func, help_text in (
        ("validate", _cmd_validate, "validate a recipe, check what it needs (preflight), print it resolved"),
        ("launch", _cmd_launch, "run a recipe (same as python -m rtrain.launch)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.2")
        if name == "validate":
            p.add_argument("--schema-only", action="store_true",
                           help="check the recipe itself only, not its data, output root, tracking server")
        p.set_defaults(func=func)
    _add_checkpoint_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
