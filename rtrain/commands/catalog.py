"""`rtrain recipes` (the packaged recipes by name) and `rtrain recipe-keys` (every key of the schema)."""

from __future__ import annotations

import argparse
import json


def add_recipes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="how the list is printed (default table)")


def run_recipes(args: argparse.Namespace) -> int:
    from rtrain.config.named import RECIPES_DIR, packaged_recipes

    recipes = packaged_recipes()
    if args.format == "json":
        print(json.dumps([{"name": r.name, "purpose": r.purpose, "path": str(r.path)} for r in recipes], indent=1))
        return 0
    width = max((len(r.name) for r in recipes), default=4)
    for r in recipes:
        print(f"{r.name:<{width}}  {r.purpose}")
    print(f"\n(in {RECIPES_DIR}; give a name or a path to launch, validate, bench)")
    return 0


def add_recipe_keys_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--section", help="only this section's keys (run, model, data, train, optim, schedule, "
                        "precision, dist, checkpoint, tracking, eval, analysis)")
    parser.add_argument("--format", choices=("table", "markdown", "json"), default="table",
                        help="how the list is printed (default table; markdown is the docs' reference page)")


def run_recipe_keys(args: argparse.Namespace) -> int:
    from rtrain.config.reference import key_rows, render_json, render_markdown, render_table

    rows = key_rows()
    if args.section:
        sections = list(dict.fromkeys(r.section for r in rows))
        rows = [r for r in rows if r.section == args.section]
        if not rows:
            raise ValueError(f"--section {args.section}: not a recipe section; sections: {', '.join(sections)}")
    render = {"table": render_table, "markdown": render_markdown, "json": render_json}[args.format]
    print(render(rows), end="" if args.format != "markdown" else "\n")
    return 0
