"""`python -m cluster files`: where the installed SLURM scripts and Ray cluster YAML are (they ship inside the
package, so an installed rtrain has them without a checkout), and which helpers `python -m cluster.*` offers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELPERS = {
    "cluster.local.ray_head": "start/stop a local Ray head by PID",
    "cluster.local.mlflow_server": "start/stop a local MLflow tracking server by PID",
    "cluster.slurm.ray_node": "Ray on a SLURM allocation (called by the sbatch scripts)",
    "cluster.slurm.workers": "the workers a SLURM allocation holds: nodes x GPUs per node (called by the scripts)",
}


def files() -> list[Path]:
    return sorted([*(HERE / "slurm").glob("*.sbatch"), *(HERE / "ray").glob("*.yaml"), *(HERE / "ray").glob("*.md")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("files", "helpers"), help="files: the paths of the sbatch scripts and "
                        "cluster YAML; helpers: the python -m cluster.* commands")
    args = parser.parse_args(argv)
    if args.what == "files":
        print("\n".join(str(path) for path in files()))
    else:
        print("\n".join(f"python -m {name:<28} {what}" for name, what in HELPERS.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
