"""Stop signals before the launcher's heavy imports: a SIGTERM/SIGUSR1 (SIGINT) then ends the launcher at once
with 75 (130) and one line: nothing was trained, so nothing needs saving. Once the run starts, the launchers
install their own handlers (rtrain.launch.signals), which checkpoint first. Imports nothing of rtrain."""

import signal
import sys

EARLY_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 75, signal.SIGUSR1: 75}  # rtrain.launch.signals' codes


def _stopped_before_training(signum, frame):
    name = signal.Signals(signum).name
    print(f"rtrain: stopped by {name} before training started: nothing to save; rerun the same command to start",
          file=sys.stderr, flush=True)
    raise SystemExit(EARLY_EXIT[signum])


def install_early_handlers() -> None:
    for signum in EARLY_EXIT:
        signal.signal(signum, _stopped_before_training)
