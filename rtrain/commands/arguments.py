"""Command-line arguments of `rtrain eval` and `rtrain export`. Imports nothing heavy, so building the parser
(`rtrain models`, `rtrain --help`) does not pay for torch; tests check the constants against their owners
(rtrain.engine.evaluate.EVAL_MODES, rtrain.engine.eval_views.PAPER_SCALES, rtrain.models.export)."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a wrong argument is one `rtrain: ...` line on stderr and exit 2 (the usage is in --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("rtrain").strip()  # `rtrain eval`: eval; `python -m rtrain.launch`: as is
        print(f"rtrain: {command + ': ' if command else ''}{message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def parse_with_overrides(self, argv: list[str] | None = None) -> argparse.Namespace:
        """parse_args, but `key=value` overrides may also come after a flag (`validate r50 --schema-only
        optim.lr=1`): argparse leaves those over, they join the command's overrides."""
        args, extra = self.parse_known_args(argv)
        takes_overrides = hasattr(args, "overrides")
        unknown = [e for e in extra if not (takes_overrides and "=" in e and not e.startswith("-"))]
        if unknown:
            command = getattr(args, "command", None)  # the subcommand's parser names itself in the line
            where = OneLineParser(prog=f"{self.prog} {command}") if command else self
            where.error(f"unrecognized arguments: {' '.join(unknown)}")
        if extra:
            args.overrides = [*args.overrides, *extra]
        return args

EVAL_MODES = ("center", "ten_crop", "multi_scale")
PAPER_SCALES = (224, 256, 384, 480, 640)
EXPORT_FORMATS = ("torchvision",)
CHECKPOINT_HELP = "a step-N/ checkpoint folder, or a run directory (its newest verified checkpoint)"


def parse_scales(text: str) -> list[int]:
    try:
        scales = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        scales = []
    if not scales or min(scales) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive shorter sides like 224,256,384")
    return scales


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("--data", help="shard root holding <val split>/manifest.json (default: the recipe's "
                        "data.source)")
    parser.add_argument("--mode", choices=EVAL_MODES, default="center", help="center crop (default), the paper's "
                        "10-crop, or fully-convolutional multi-scale testing (--scales)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: eval.batch_size, "
                        "else the training micro-batch)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images of the split")
    parser.add_argument("--scales", type=parse_scales, help="multi_scale: shorter sides, comma-separated "
                        f"(default: eval.scales, else the paper's {','.join(map(str, PAPER_SCALES))} scaled by "
                        "data.image_size/224)")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="the layout of the written "
                        "file: torchvision = a state dict torchvision.models.resnet* loads")
    parser.add_argument("--backbone-only", action="store_true",
                        help="without fc and num_batches_tracked: the body of torchvision's detection backbones")
    parser.add_argument("--out", required=True, help="the state dict file to write (torch.save)")


RECIPE_HELP = "recipe: a YAML file, or a packaged recipe's name (`rtrain recipes` lists them)"
OVERRIDES_HELP = "dotted recipe overrides typed like YAML, e.g. optim.lr=0.2 dist.num_workers=4"


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help=RECIPE_HELP)
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=OVERRIDES_HELP)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m rtrain.launch` and `rtrain launch`: one parser, so the two are the same command."""
    add_recipe_arguments(parser)
    parser.add_argument("--worker", metavar="MODULE:FUNCTION",
                        help="per-worker function to run instead of rtrain.launch.worker:run_worker")
    parser.add_argument("--max-failures", type=int, default=None,
                        help="ray launcher: restart the worker group this many times after a failure "
                             "(default: the recipe's dist.max_failures)")
    parser.add_argument("--debug", action="store_true",
                        help="print tracebacks for expected failures too (bad data, damaged checkpoints, ...)")


REPRODUCIBLE = ("degradation",)


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=REPRODUCIBLE,
                        help="degradation: plain-20/56 vs ResNet-20/56 on digits (the paper's Fig. 6)")
    parser.add_argument("--out", help="folder for data, runs, MLflow (sqlite), table and figure (default "
                        "out/degradation, with --quick out/degradation-quick); a rerun skips finished runs")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the recipes' 30; with --quick 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke version: plain-20 and ResNet-20 only, "
                        "2 epochs unless --epochs")
    parser.add_argument("--data", help="existing digits shards (<dir>/train, <dir>/val) instead of preparing "
                        "them under --out")
    parser.add_argument("--recipes", help="folder of the nets' recipes plain20/56.yaml, resnet20/56.yaml "
                        "(default: the packaged degradation recipes, `rtrain recipes`)")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow store: sqlite:///path/mlflow.db or http(s)://server "
                        "(default: MLFLOW_TRACKING_URI, else sqlite:///out/demo/mlflow.db, the demo's)")
    parser.add_argument("--experiment", help="experiment name (default: every experiment)")
    parser.add_argument("--runs", nargs="+", metavar="ID_OR_NAME", help="run ids or run names (default: every "
                        "run of the experiment)")
    parser.add_argument("--metric", nargs="+", dest="metrics", metavar="KEY", help="metrics to compare: "
                        "top1_error means train/top1_error and val/top1_error (default: top1_error)")
    parser.add_argument("--out", help="write a PNG of the metrics' curves here (training dashed, validation solid)")
    parser.add_argument("--x", choices=("auto", "epochs", "steps"), default="auto", dest="x_axis",
                        help="x axis of the PNG (auto: epochs when every run recorded its epoch length)")
    parser.add_argument("--format", choices=("table", "csv", "markdown"), default="table",
                        help="how the table is printed (default table)")
    parser.add_argument("--layer-responses", action="store_true", help="also overlay the runs' layer responses "
                        "(Fig. 7) in <out>-layer-responses.png (default layer-responses.png)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--loader-batches", type=int, default=20,
                        help="batches timed through the loader after the first (default 20)")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first (default 2)")
