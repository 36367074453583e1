"""What `rtrain --help` and each command's `--help` say beyond their flags: a description, examples and exit
codes; the exit codes and environment variables of the whole tool. Plain data (imports nothing), so the help
costs no torch; docs/reference/ is generated from it and from the parsers (rtrain.commands.reference)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Every exit code the tool's commands end with; each command's help names its own.
EXIT_CODES = {
    0: "done",
    1: "the run failed (a worker failed, every checkpoint damaged and resume refused, ...)",
    2: "an expected failure before or instead of any work: a bad recipe, key or override, missing data, an "
       "unreachable tracking server, a damaged checkpoint, a wrong argument; one `rtrain: ...` line per problem",
    75: "stopped by SIGTERM or SIGUSR1 (preemption) after a verified checkpoint: rerun the same command to resume "
        "(EX_TEMPFAIL)",
    76: "the stall watchdog ended the run (a rank made no progress for dist.stall_timeout_s): retryable, rerun "
        "the same command to resume",
    130: "stopped by SIGINT (Ctrl-C) after a verified checkpoint: rerun the same command to resume",
}

# Environment variables rtrain reads (a test checks every RTRAIN_* in the sources is here).
ENVIRONMENT = {
    "RTRAIN_DEBUG": "1 = print tracebacks for expected failures too (`--debug` sets it; the ranks inherit it).",
    "RTRAIN_LOG_LEVEL": "The workers' Python log level (default INFO).",
    "RTRAIN_LIBJPEG": "Path of the libjpeg-turbo shared library used for region decoding (default: searched).",
    "RTRAIN_NNODES": "Local launcher across nodes: how many nodes run one launch (set by the SLURM scripts).",
    "RTRAIN_NODE_RANK": "Local launcher across nodes: this node's index, 0 to RTRAIN_NNODES-1.",
    "RTRAIN_LAUNCHER_PID": "Set by the local launcher for its ranks (which process to watch); not for users.",
    "RTRAIN_PYTHON": "SLURM scripts: the Python that has rtrain installed (default: python3 on PATH).",
    "RTRAIN_WORKERS_PER_NODE": "SLURM scripts: workers per node when dist.num_workers is not given on the "
                               "command line (default: the GPUs per node, SLURM_GPUS_PER_NODE or "
                               "SLURM_GPUS_ON_NODE, else 1).",
    "RTRAIN_STALL_REQUEUES": "SLURM scripts: how often a job whose rank stalled (exit 76) is requeued "
                             "(default 2).",
    "RTRAIN_RAY_NODE_IP": "SLURM Ray bring-up: the IP address this node's Ray uses (default: the address the "
                          "scheduler knows the node by).",
    "RTRAIN_RAY_PORT": "SLURM Ray bring-up: the Ray head's port (default: derived from the job id).",
    "RTRAIN_RAY_START_TIMEOUT_S": "SLURM Ray bring-up: how long to wait for every node's Ray to join.",
    "RAY_ADDRESS": "Ray launcher: the cluster to run on when the recipe has no dist.ray_address (else a local "
                   "Ray is started).",
    "MLFLOW_TRACKING_URI": "`rtrain compare`: the MLflow store when --tracking-uri is not given.",
    "MLFLOW_TRACKING_TOKEN": "MLflow server credentials (bearer token); never written down.",
    "MLFLOW_TRACKING_USERNAME": "MLflow server credentials (basic auth, with MLFLOW_TRACKING_PASSWORD); never "
                                "written down.",
    "MLFLOW_TRACKING_PASSWORD": "See MLFLOW_TRACKING_USERNAME.",
    "AWS_ACCESS_KEY_ID": "S3 credentials for s3:// shards and checkpoints (with AWS_SECRET_ACCESS_KEY); never "
                         "written down.",
    "AWS_SECRET_ACCESS_KEY": "See AWS_ACCESS_KEY_ID.",
    "AWS_ENDPOINT_URL_S3": "An S3-compatible endpoint (MinIO, moto) for s3:// URLs (also AWS_ENDPOINT_URL).",
}


@dataclass(frozen=True)
class CommandHelp:
    summary: str  # one line, in `rtrain --help`
    description: str
    examples: tuple[str, ...]
    exit_codes: tuple[int, ...] = (0, 2)
    notes: dict[int, str] = field(default_factory=dict)  # what a code means for this command, if it differs


COMMANDS = {
    "launch": CommandHelp(
        "run a recipe (the same command as python -m rtrain.launch)",
        "Validate a recipe (a file, or a packaged recipe's name: `rtrain recipes`), check what it needs (data, "
        "output folder, tracking server), then run it with its dist.launcher: Ray Train (a local Ray, RAY_ADDRESS "
        "or dist.ray_address) or plain local processes. Rerunning the same command resumes from the newest "
        "verified checkpoint.",
        ("rtrain launch quickstart data.source=out/demo/shards",
         "rtrain launch recipes/r50_paper.yaml optim.lr=0.2 train.epochs=2",
         "ray job submit --working-dir . -- rtrain launch r152_256gpu"),
        (0, 1, 2, 75, 76, 130)),
    "validate": CommandHelp(
        "check a recipe and what it needs, print it resolved; creates nothing",
        "Load a recipe with its overrides, check every key and value, then (unless --schema-only) what the run "
        "needs: readable manifests for both splits, a writable output folder, an answering tracking server, "
        "model.init_from. Prints the resolved recipe. Creates no folder or file.",
        ("rtrain validate quickstart", "rtrain validate recipes/r50_lars.yaml optim.lr=9.0 --schema-only")),
    "recipes": CommandHelp(
        "list the packaged recipes by name, with their purpose and path",
        "The recipes that ship with rtrain. Any command that takes a recipe takes one of these names or a path.",
        ("rtrain recipes", "rtrain recipes --format json"), (0,)),
    "recipe-keys": CommandHelp(
        "every recipe key: type, default, allowed values, description",
        "Every key a recipe may set, read from the schema (the same list as the docs' recipe-keys reference).",
        ("rtrain recipe-keys --section optim", "rtrain recipe-keys --format markdown"), (0, 2)),
    "models": CommandHelp(
        "list registered models with parameters and multiply-adds",
        "Every model name a recipe's model.name may use, with its parameter count, multiply-adds per image and "
        "input size.",
        ("rtrain models", "rtrain models --format csv"), (0,)),
    "status": CommandHelp(
        "a run at a glance, live or ended: state, step, ETA, goodput, checkpoint, slowest rank",
        "Read a run directory (run.output_root/run.name) without touching it: state, step and ETA, attempts, "
        "goodput and what the rest was spent on, the newest checkpoint, the slowest rank and stragglers, the "
        "MLflow run.",
        ("rtrain status out/demo/runs/quickstart", "rtrain status runs/r152_256gpu --watch 10"), (0, 2),
        {0: "the run was read, whatever its state (it reports; it does not judge)"}),
    "compare": CommandHelp(
        "MLflow runs side by side: differing recipe keys, final/best metrics, a PNG of their curves",
        "Runs of an MLflow store in one table (the recipe keys that differ, final and best metrics) and, with "
        "--out, their curves in the paper's style.",
        ("rtrain compare --tracking-uri sqlite:///out/demo/mlflow.db --experiment quickstart --out compare.png",
         "rtrain compare --runs RUN_A RUN_B --metric top1_error loss --format markdown"), (0, 1, 2),
        {1: "no run matched"}),
    "bench": CommandHelp(
        "a recipe's loader img/s and training-step img/s on this machine, and which one is the bottleneck",
        "Time the recipe's input pipeline and its training step separately on this machine and name the slower "
        "one.",
        ("rtrain bench quickstart data.source=out/demo/shards",
         "rtrain bench recipes/r50_paper.yaml data.source=/data/shards --steps 10"), (0, 2)),
    "eval": CommandHelp(
        "top-1/top-5 error of a checkpoint on the val split (center, 10-crop, multi-scale)",
        "Rebuild the model from the checkpoint's own recipe, verify the checkpoint, and score the val split.",
        ("rtrain eval out/demo/runs/quickstart", "rtrain eval runs/r50/checkpoints/step-500 --mode ten_crop"),
        (0, 2)),
    "export": CommandHelp(
        "a checkpoint's weights as a torchvision state dict",
        "Write a verified checkpoint's weights in torchvision's layout (torchvision.models.resnet50 loads it).",
        ("rtrain export runs/r50 --format torchvision --out r50.pt",), (0, 2)),
    "reproduce": CommandHelp(
        "reproduce a finding of the paper with real runs: degradation (plain vs ResNet-20/56 on digits)",
        "Run the paper's degradation experiment (Fig. 6) at CPU scale through real launches and write its table "
        "and figure; a rerun skips finished runs and resumes an interrupted one.",
        ("rtrain reproduce degradation --quick", "rtrain reproduce degradation --out out/degradation"),
        (0, 2, 75, 130)),
}

# Entry points that are not `rtrain` subcommands (rtrain never imports data_prep or cluster): `rtrain --help`
# lists them; the CLI reference shows their --help.
OTHER_ENTRY_POINTS = {
    "python -m rtrain.launch": "the launcher itself (`rtrain launch` is the same command)",
    "python -m data_prep.samples": "small real datasets (digits, photos) as ImageNet-style folders",
    "python -m data_prep.imagenet": "an ImageNet-style folder -> verified WebDataset shards, as Ray tasks",
    "python -m data_prep.index": "a manifest for WebDataset shards that already exist",
    "python -m data_prep.verify": "re-check every shard of a split against its manifest",
    "python -m cluster": "`files`: where the installed SLURM scripts and Ray cluster YAML are",
    "python -m cluster.local.ray_head": "start/stop a local Ray head by PID",
    "python -m cluster.local.mlflow_server": "start/stop a local MLflow tracking server by PID",
    "python -m cluster.slurm.ray_node": "Ray on a SLURM allocation (called by cluster/slurm/*.sbatch)",
    "python -m cluster.slurm.workers": "the workers a SLURM allocation holds: nodes x GPUs per node (called by "
                                       "the sbatch scripts)",
}


# Flags that several commands have mean the same thing in each (a test checks each parser's use of them).
SHARED_FLAGS = {
    "--format": "how the command prints or writes its output (a table, csv, markdown, json; export: the "
                "layout of the written file)",
    "--out": "where the command writes its output (a file or a folder, as its help says); never read",
    "--data": "a shard root holding <split>/manifest.json, instead of the recipe's data.source",
    "--workers": "how many processes (or Ray CPUs) the command itself uses in parallel",
    "--debug": "tracebacks for expected failures too",
}


def epilog(name: str) -> str:
    """The `--help` text after the flags: examples and exit codes."""
    info = COMMANDS[name]
    lines = ["examples:", *(f"  {example}" for example in info.examples), "", "exit codes:"]
    lines += [f"  {code:>3}  {info.notes.get(code, EXIT_CODES[code])}" for code in info.exit_codes]
    return "\n".join(lines)


def main_epilog() -> str:
    width = max(len(name) for name in OTHER_ENTRY_POINTS)
    lines = ["other entry points (their own --help):"]
    lines += [f"  {name:<{width}}  {what}" for name, what in OTHER_ENTRY_POINTS.items()]
    lines += ["", "A RECIPE is a YAML file or a packaged recipe's name (`rtrain recipes`).",
              "Expected failures print one `rtrain: ...` line each and exit 2; `--debug` (launch) shows tracebacks."]
    return "\n".join(lines)
