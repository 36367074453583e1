"""`rtrain` console script: launch | validate | recipes | recipe-keys | models | status | compare | bench | eval |
export | reproduce.

Each subcommand parses its own arguments and imports its implementation lazily, so `rtrain models` does not pay
for Ray or MLflow imports. What each says in --help beyond its flags (description, examples, exit codes) is in
rtrain.commands.help_text. Every expected failure (a bad recipe or argument, missing data, a damaged checkpoint,
a store it cannot read) is one `rtrain: ...` line per problem on stderr and exit code 2 (`compare`: 1 when no
run matches); `launch` keeps the launcher's codes (rtrain.commands.help_text.EXIT_CODES).
"""

from __future__ import annotations

import argparse
import sys

from rtrain.commands.arguments import OneLineParser


def _failure(exc: BaseException, code: int = 2) -> int:
    from rtrain._errors import error_lines
    from rtrain.config import RecipeError
    from rtrain.config.redact import redact_url

    text = str(exc) if isinstance(exc, RecipeError) else " ".join(str(exc).split())  # one line, whatever it held
    print(error_lines(redact_url(text)), file=sys.stderr)
    return code


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
    from rtrain.launch.preflight import PreflightError, preflight
    from rtrain.launch.recipe import check_model_name, prepare_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_model_name(recipe)
        if not args.schema_only:
            preflight(prepare_recipe(recipe), create=False)
    except (RecipeError, PreflightError) as exc:
        return _failure(exc if isinstance(exc, RecipeError) else RecipeError(str(exc)))
    print(recipe.to_yaml(), end="")
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from rtrain.launch.early import install_early_handlers

    install_early_handlers()  # as `python -m rtrain.launch` does, before the imports that take seconds
    from rtrain.launch.entry import run

    return run(args)


def _cmd_recipes(args: argparse.Namespace) -> int:
    from rtrain.commands.catalog import run_recipes

    return run_recipes(args)


def _cmd_recipe_keys(args: argparse.Namespace) -> int:
    from rtrain.commands.catalog import run_recipe_keys

    try:
        return run_recipe_keys(args)
    except ValueError as exc:
        return _failure(exc)


def _cmd_eval(args: argparse.Namespace) -> int:
    from rtrain.commands import evaluate_checkpoint

    return _run_checkpoint_command(evaluate_checkpoint.run, args)


def _cmd_export(args: argparse.Namespace) -> int:
    from rtrain.commands import export_checkpoint

    return _run_checkpoint_command(export_checkpoint.run, args)


def _run_checkpoint_command(run, args: argparse.Namespace) -> int:
    from rtrain.checkpoint import CheckpointError
    from rtrain.commands.checkpoint_source import CommandError
    from rtrain.config import RecipeError
    from rtrain.data import DecodeError, SampleError, ShardError

    try:
        return run(args)
    except (CommandError, CheckpointError, RecipeError, ShardError, SampleError, DecodeError, OSError) as exc:
        return _failure(exc)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from rtrain.commands import degradation_report, reproduce

    try:
        return reproduce.run(args)
    except (reproduce.ReproduceError, degradation_report.ReportError, OSError) as exc:
        return _failure(exc)


def _cmd_bench(args: argparse.Namespace) -> int:
    from rtrain.commands import bench
    from rtrain.config import RecipeError
    from rtrain.data import DecodeError, SampleError, ShardError

    try:
        return bench.run(args)
    except (bench.BenchError, RecipeError, ShardError, SampleError, DecodeError, OSError) as exc:
        return _failure(exc)


def _cmd_compare(args: argparse.Namespace) -> int:
    from rtrain.commands import compare_runs
    from rtrain.tracking.compare import CompareError, NoRunsError

    try:
        return compare_runs.run(args)
    except NoRunsError as exc:
        return _failure(exc, 1)
    except (CompareError, OSError) as exc:
        return _failure(exc)


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
        return _failure(exc)
    except KeyboardInterrupt:
        return 0


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run directory (run.output_root/run.name)")
    p.add_argument("--watch", type=float, nargs="?", const=5.0, default=0.0, metavar="SECONDS",
                   help="redraw every SECONDS (5) until the run is no longer running")


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    from rtrain.commands.arguments import add_recipe_arguments

    add_recipe_arguments(p)
    p.add_argument("--schema-only", action="store_true", help="check the recipe itself only (keys, values, "
                   "model name), not its data, output root or tracking server")


def _models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "csv"), default="table", help="how the list is printed "
                   "(default table)")


def _commands() -> dict:
    """name -> (run, add its arguments); the order of `rtrain --help`."""
    from rtrain.commands import arguments as a
    from rtrain.commands import catalog as c

    return {"launch": (_cmd_launch, a.add_launch_arguments), "validate": (_cmd_validate, _validate_arguments),
            "recipes": (_cmd_recipes, c.add_recipes_arguments),
            "recipe-keys": (_cmd_recipe_keys, c.add_recipe_keys_arguments),
            "models": (_cmd_models, _models_arguments), "status": (_cmd_status, _status_arguments),
            "compare": (_cmd_compare, a.add_compare_arguments), "bench": (_cmd_bench, a.add_bench_arguments),
            "eval": (_cmd_eval, a.add_eval_arguments), "export": (_cmd_export, a.add_export_arguments),
            "reproduce": (_cmd_reproduce, a.add_reproduce_arguments)}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("rtrain")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from rtrain.commands.help_text import COMMANDS, epilog, main_epilog

    raw = argparse.RawDescriptionHelpFormatter
    parser = OneLineParser(prog="rtrain", formatter_class=raw, epilog=main_epilog(),
                           description="Distributed ResNet training: recipes, launches, runs, checkpoints.")
    parser.add_argument("--version", action="version", version=f"rtrain {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, add_arguments) in _commands().items():
        info = COMMANDS[name]
        p = sub.add_parser(name, help=info.summary, description=info.description, epilog=epilog(name),
                           formatter_class=raw)
        add_arguments(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_with_overrides(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
