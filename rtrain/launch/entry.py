"""`python -m rtrain.launch RECIPE [key=value ...]` (also `rtrain launch`): validate a recipe, then run it on
Ray Train or locally.

Launchers (dist.launcher):
- ray:   TorchTrainer on the cluster at dist.ray_address, else RAY_ADDRESS, else a Ray started here.
- local: dist.num_workers plain processes on this host with torchrun's environment variables.
Either way every worker runs `worker_fn({"recipe_yaml": <resolved recipe>})` and rank 0's returned
summary comes back here and is printed as JSON. Heavy imports (torch, Ray) happen only when needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from rtrain._errors import DEBUG_ENV, error_lines
from rtrain.config import Recipe, RecipeError, load_recipe
from rtrain.config.redact import redact_url
from rtrain.launch.preflight import PreflightError, preflight
from rtrain.launch.recipe import prepare_recipe, write_resolved_recipe
from rtrain.launch.signals import exit_code_for
from rtrain.launch.errors import LaunchError
from rtrain.launch.identity import check_resume_identity
from rtrain.launch.owner import RunLock
from rtrain.launch.workers import WorkerFn, default_worker, load_worker_or_fail


def run_owner(recipe: Recipe) -> contextlib.AbstractContextManager:
    """Ownership of the run directory (rtrain.launch.owner) for a launch of `recipe` (paths pinned): taken
    before anything is written into it. Another node's share of a multi-node local launch is part of node 0's
    launch, which holds it."""
    if recipe.dist.launcher == "local" and int(os.environ.get("RTRAIN_NODE_RANK", "0") or 0) > 0:
        return contextlib.nullcontext()
    return RunLock(recipe.run_dir)


def launch(recipe: Recipe, worker_fn: WorkerFn | None = None, max_failures: int | None = None,
           owned: bool = False) -> dict:
    """Validate and run `recipe` with its dist.launcher; returns rank 0's summary or raises LaunchError.
    `owned`: the caller already holds the run directory (run_owner)."""
    recipe = prepare_recipe(recipe)
    with contextlib.nullcontext() if owned else run_owner(recipe) as lock:
        if lock is not None and lock.took_over_from:
            print(f"rtrain: run directory {recipe.run_dir}: taking over from a launch that ended without "
                  f"releasing it ({lock.took_over_from})", file=sys.stderr, flush=True)
        check_resume_identity(recipe)  # before anything is written: a checkpoint of another run is refused
        recipe_path = write_resolved_recipe(recipe)
        worker_fn = worker_fn or default_worker()
        d = recipe.dist
        print(f"rtrain: run {recipe.run.name!r}: model {recipe.model.name}, {d.num_workers} worker(s) "
              f"({'GPU/nccl' if d.use_gpu else 'CPU/gloo'}) via the {d.launcher} launcher; "
              f"resolved recipe {recipe_path}", file=sys.stderr, flush=True)
        if d.launcher == "local":
            from rtrain.launch.local import launch_local

            return launch_local(recipe, worker_fn)
        from rtrain.launch.ray import launch_ray

        return launch_ray(recipe, worker_fn, recipe.dist.max_failures if max_failures is None else max_failures)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from rtrain.commands.arguments import OneLineParser, add_launch_arguments
    from rtrain.commands.help_text import COMMANDS, epilog

    parser = OneLineParser(prog="python -m rtrain.launch", description=COMMANDS["launch"].description,
                                     epilog=epilog("launch"), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_arguments(parser)
    return parser.parse_with_overrides(argv)


def main(argv: list[str] | None = None) -> int:
    return run(_parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """`python -m rtrain.launch` and `rtrain launch` with their (shared) arguments parsed."""
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # the ranks inherit it
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        worker_fn = load_worker_or_fail(args.worker) if args.worker else None
        # Before any worker or Ray, and before the run directory is made or taken (preflight writes nothing):
        # a custom --worker may not read the recipe's data, so only its outputs count.
        preflight(prepare_recipe(recipe), data=worker_fn is None)
        summary = launch(recipe, worker_fn, max_failures=args.max_failures)
    except RecipeError as exc:
        print(error_lines(redact_url(str(exc))), file=sys.stderr)
        return 2
    except PreflightError as exc:
        print(error_lines(redact_url(str(exc))), file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"rtrain: {redact_url(str(exc))}", file=sys.stderr)
        return exc.exit_code
    if summary.get("rank", 0) != 0:  # another node's share of a multi-node local launch: node 0 reports
        return exit_code_for(summary.get("signal")) if summary.get("preempted") else 0
    _print_closing(prepare_recipe(recipe), summary)
    print(json.dumps(summary, default=str, sort_keys=True))
    if summary.get("preempted"):
        print(f"rtrain: stopped by {summary.get('signal')} after step {summary.get('step')}: checkpoint "
              f"{summary.get('checkpoint')}; rerun the same command to resume", file=sys.stderr, flush=True)
        return exit_code_for(summary.get("signal"))
    return 0


def _print_closing(recipe: Recipe, summary: dict) -> None:
    """What a person wants at the end of a run: how it went, where it is, how to look at it."""
    if "step" not in summary or summary.get("preempted"):  # a custom --worker's summary; a stopped run
        return
    top1 = summary.get("val_top1")
    result = f"val top-1 {top1:.4f} (best {summary.get('best_top1', 0):.4f})" if top1 is not None else "no eval"
    lines = [f"finished {recipe.run.name!r}: step {summary['step']}/{summary.get('total_steps', '?')}, "
             f"epoch {summary.get('epoch')}, {result}",
             f"run directory {recipe.run_dir} (resolved recipe, checkpoints)"]
    if summary.get("checkpoint"):
        lines.append(f"last checkpoint {summary['checkpoint']}")
    if recipe.tracking.enabled and summary.get("run_id"):
        uri = redact_url(recipe.tracking.uri)
        view = f"mlflow ui --backend-store-uri {uri}" if "://" in uri and not uri.startswith("http") else uri
        lines.append(f"MLflow run {summary['run_id']} (experiment {recipe.tracking.experiment!r}): {view}")
    print("\n".join(f"rtrain: {line}" for line in lines), file=sys.stderr, flush=True)
