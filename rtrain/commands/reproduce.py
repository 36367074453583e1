"""`rtrain reproduce degradation`: the paper's degradation experiment (He et al. 2015, Sec. 4.2, Fig. 6) at
CPU scale, made with rtrain's own tools.

Four real runs, plain-20/56 and ResNet-20/56 (`recipes/degradation/`), each its own `python -m rtrain.launch`
subprocess, all in one MLflow experiment (a sqlite store under --out); then a markdown table of the final
training and validation errors and their curves in Fig. 6's style (`rtrain.commands.degradation_report`).
The data is scikit-learn's real handwritten digits, prepared by data_prep as `make demo` does (run as
subprocesses: rtrain does not import data_prep). A rerun skips finished runs and resumes an interrupted one
from its newest checkpoint, into the same MLflow run.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtrain.config.named import RECIPES_DIR

NETS = ("plain20", "plain56", "resnet20", "resnet56")
QUICK_NETS = ("plain20", "resnet20")
QUICK_EPOCHS = 2
WARM_START_EPOCHS = 2.0  # the recipes' constant lr/10 warm start; shortened for very short runs
DECAY_AT = 0.75  # lr / 10 at this fraction of the epochs, as in the recipes
EXPERIMENT = "degradation"
RECORD = "reproduce.json"
STOPPED_EXIT_CODES = (75, 130)  # the launcher checkpointed after a signal: a rerun resumes


class ReproduceError(RuntimeError):
    """An expected failure of `rtrain reproduce`; the message is one line naming the run, file or folder."""


class Stopped(Exception):
    def __init__(self, net: str, code: int) -> None:
        super().__init__(f"run {net} was stopped (exit {code}) after a checkpoint; rerun the same command to "
                         "resume it")
        self.code = code


@dataclass(frozen=True)
class Plan:
    out: Path
    recipes: Path
    data: Path
    prepare_data: bool
    nets: tuple[str, ...]
    epochs: int | None  # None: the recipes' own length

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.out / 'mlflow.db'}"

    def run_dir(self, net: str) -> Path:
        return self.out / "runs" / net

    def recipe(self, net: str) -> Path:
        return self.recipes / f"{net}.yaml"

    def overrides(self, net: str) -> list[str]:
        return [f"data.source={self.data}", f"run.output_root={self.out / 'runs'}", f"run.name={net}",
                f"tracking.uri={self.tracking_uri}", f"tracking.experiment={EXPERIMENT}",
                *schedule_overrides(self.epochs)]


def schedule_overrides(epochs: int | None) -> list[str]:
    """A run length other than the recipes': the warm start stays 2 epochs (a quarter of very short runs),
    the lr still drops at 75 %."""
    if epochs is None:
        return []
    warm = min(WARM_START_EPOCHS, epochs / 4)
    return [f"train.epochs={epochs}", f"schedule.warmup_epochs={warm:g}",
            f"schedule.milestones_epochs=[{DECAY_AT * epochs:g}]"]


def plan_from_args(args: argparse.Namespace) -> Plan:
    if args.epochs is not None and args.epochs < 1:
        raise ReproduceError(f"--epochs must be at least 1, got {args.epochs}")
    out = Path(args.out or ("out/degradation-quick" if args.quick else "out/degradation")).resolve()
    recipes = Path(args.recipes).resolve() if args.recipes else RECIPES_DIR / "degradation"
    nets = QUICK_NETS if args.quick else NETS
    missing = [str(recipes / f"{net}.yaml") for net in nets if not (recipes / f"{net}.yaml").is_file()]
    if missing:
        raise ReproduceError(f"--recipes {args.recipes or recipes}: no recipe {', '.join(missing)}")
    data = Path(args.data).resolve() if args.data else out / "shards"
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else None)
    return Plan(out=out, recipes=recipes, data=data, prepare_data=args.data is None, nets=nets, epochs=epochs)


def _run_module(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", *args], stdout=sys.stderr)
    if done.returncode != 0:
        raise ReproduceError(f"python -m {' '.join(args)} exited {done.returncode} (its messages are above)")


def prepare_data(plan: Plan) -> None:
    """The digits as `make demo` makes them: an ImageNet-style folder, then shards; kept for reruns."""
    if all((plan.data / split / "manifest.json").is_file() for split in ("train", "val")):
        return
    if not plan.prepare_data:
        raise ReproduceError(f"--data {plan.data}: no train/manifest.json and val/manifest.json there")
    folders = plan.out / "digits"
    _run_module("data_prep.samples", "digits", "--out", str(folders))
    _run_module("data_prep.imagenet", "--src", str(folders), "--out", str(plan.data), "--shard-size", "200",
                "--workers", "2", "--no-progress")


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReproduceError(f"{path}: unreadable ({exc}); remove it to rerun that net") from None


def _write_record(path: Path, record: dict[str, Any]) -> None:
    from rtrain._io import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _settings(plan: Plan, net: str) -> dict[str, Any]:
    return {"recipe": str(plan.recipe(net)), "overrides": plan.overrides(net)}


def _forward_signals(proc: subprocess.Popen) -> dict:
    """SIGTERM/SIGUSR1 to this command reach the launcher, which checkpoints and exits 75 (Ctrl-C reaches it
    through the process group already)."""
    def forward(signum, _frame):
        proc.send_signal(signum)

    return {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}


def launch_net(plan: Plan, net: str) -> dict[str, Any]:
    """One real `python -m rtrain.launch` of the net's recipe; its JSON summary (the last stdout line)."""
    command = [sys.executable, "-m", "rtrain.launch", str(plan.recipe(net)), *plan.overrides(net)]
    print(f"rtrain reproduce: {net}: python {' '.join(command[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    previous = _forward_signals(proc)
    try:
        try:
            stdout, _ = proc.communicate()
        except KeyboardInterrupt:  # the launcher got the SIGINT too: let it checkpoint and exit
            stdout, _ = proc.communicate()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    sys.stderr.write(stdout)
    if proc.returncode in STOPPED_EXIT_CODES:
        raise Stopped(net, proc.returncode)
    if proc.returncode != 0:
        raise ReproduceError(f"run {net}: python -m rtrain.launch exited {proc.returncode} (its messages are "
                             "above); rerun to resume it from its newest checkpoint")
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise ReproduceError(f"run {net}: the launcher printed no JSON summary as its last line") from None


def run_net(plan: Plan, net: str) -> dict[str, Any]:
    """The net's finished record: from an earlier run with the same settings, or from a launch now."""
    path = plan.run_dir(net) / RECORD
    record, settings = _read_record(path), _settings(plan, net)
    if record is not None and record.get("settings") != settings:
        before = " ".join((record.get("settings") or {}).get("overrides", []))
        raise ReproduceError(f"{path}: run {net} was made with other settings ({before}); use another --out or "
                             "remove that run folder")
    if record is not None and record.get("summary"):
        print(f"rtrain reproduce: {net}: finished earlier, skipped ({path})", file=sys.stderr, flush=True)
        return record
    _write_record(path, {"settings": settings, "summary": None})
    summary = launch_net(plan, net)
    if summary.get("step") != summary.get("total_steps") or not summary.get("run_id"):
        raise ReproduceError(f"run {net}: ended at step {summary.get('step')} of {summary.get('total_steps')} "
                             f"(MLflow run {summary.get('run_id')}); rerun to finish it")
    record = {"settings": settings, "summary": summary}
    _write_record(path, record)
    return record


def run(args: argparse.Namespace) -> int:
    from rtrain.commands.degradation_report import write_report

    plan = plan_from_args(args)
    plan.out.mkdir(parents=True, exist_ok=True)
    prepare_data(plan)
    try:
        records = {net: run_net(plan, net) for net in plan.nets}
    except Stopped as stop:
        print(f"rtrain: {stop}", file=sys.stderr)
        return stop.code
    table, figure = write_report(plan.tracking_uri, EXPERIMENT, records, plan.out)
    print(table.read_text(), end="")
    print(f"rtrain reproduce: table {table}, figure {figure}, MLflow: mlflow ui --backend-store-uri "
          f"{plan.tracking_uri}", file=sys.stderr)
    return 0
