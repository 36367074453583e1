"""DeepSpeedBackend on 2 gloo processes (CPU): exact resume across fresh processes for ZeRO 0/1 and
fp32/bf16/fp16, skipped non-finite steps, gradient accumulation, and the world-size check on resume.

Every rank is a fresh ``python tests/distributed/_ds_worker.py`` process, so a resume really starts a new process
group, and every process must exit with status 0 (which is how an abort at interpreter exit would show).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from rtrain.distributed.deepspeed_backend import deepspeed_config, weights_only_safe  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_ds_worker.py")
# DeepSpeed JIT-builds its shm comm op on first use (~30 s+); keep the build next to the venv for reuse.
EXTENSIONS_DIR = REPO / ".venv" / "torch_extensions"
RUN_TIMEOUT_S = 400
STEPS, SAVE_AT, INF_AT = 6, 3, 1
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
HAS_LARS = importlib.util.find_spec("rtrain.optim.lars") is not None

RESUME_CASES = [("sgd", 0, "fp32"), ("sgd", 1, "fp32"), ("sgd", 1, "bf16"), ("sgd", 0, "fp16"), ("sgd", 1, "fp16"),
                *([("lars", 1, "fp32")] if HAS_LARS else [])]
LOGITS_DTYPE = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case_options(optimizer: str, zero: int, precision: str) -> str:
    return f"{optimizer}-z{zero}-{precision}=--optimizer {optimizer} --zero {zero} --precision {precision}"


def run_ranks(out: Path, world: int, *args: object, expect_ok: bool = True) -> list[int]:
    """Start `world` worker processes, wait for all, return their exit codes (killing all on timeout)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=str(EXTENSIONS_DIR), OMP_NUM_THREADS="1")
    port = free_port()
    procs = []
    for rank in range(world):
        log = open(out / f"log{rank}.txt", "w")
        cmd = [sys.executable, str(WORKER), "--rank", str(rank), "--world", str(world), "--port", str(port),
               "--out", str(out), *map(str, args)]
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=RUN_TIMEOUT_S))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if expect_ok and any(codes):
        tails = "\n".join(f"--- rank {r} (exit {c}) ---\n{(out / f'log{r}.txt').read_text()[-3000:]}"
                          for r, c in enumerate(codes))
        pytest.fail(f"worker exit codes {codes}\n{tails}")
    return codes


def load_weights(out: Path) -> list[dict[str, torch.Tensor]]:
    """The module state before every step and after the last one (rank 0)."""
    return torch.load(out / "weights.pt", weights_only=True)


def params_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith(BN_BUFFERS)}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"tensors differ: {differing}"


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """Per case: a straight 6-step run (state saved after step 3; step 1 gets an inf loss) and a resume of
    its step-3 state in fresh processes for the remaining 3 steps. All cases run in one pair of processes
    (straight), then in a fresh pair (resumed), once for the tests below."""
    root = tmp_path_factory.mktemp("ds_resume")
    cases = [arg for case in RESUME_CASES for arg in ("--case", case_options(*case))]
    run_ranks(root / "straight", 2, "--steps", STEPS, "--save-at", SAVE_AT, "--inf-at", INF_AT, *cases)
    run_ranks(root / "resumed", 2, "--steps", STEPS - SAVE_AT, "--inf-at", INF_AT, "--resume", root / "straight",
              "--resume-from", f"at{SAVE_AT}", *cases)

    def get(optimizer: str, zero: int, precision: str) -> tuple[Path, Path]:
        name = case_options(optimizer, zero, precision).partition("=")[0]
        return root / "straight" / name, root / "resumed" / name

    return get


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("optimizer,zero,precision", RESUME_CASES)
def test_resume_in_fresh_processes_is_bit_identical(resume_runs, optimizer, zero, precision):
    straight, resumed = resume_runs(optimizer, zero, precision)
    straight_weights, resumed_weights = load_weights(straight), load_weights(resumed)
    assert_bit_identical(resumed_weights[0], straight_weights[SAVE_AT])  # the load itself is exact
    assert_bit_identical(resumed_weights[-1], straight_weights[-1])
    straight_steps = json.loads((straight / "outcomes.json").read_text())
    resumed_steps = json.loads((resumed / "outcomes.json").read_text())
    assert resumed_steps == straight_steps[SAVE_AT:]  # same skips and loss scales after the resume
    assert {s["logits_dtype"] for s in straight_steps} == {LOGITS_DTYPE[precision]}
    # Training moved the weights (the comparison above is not between two untouched models).
    assert not torch.equal(straight_weights[0]["0.weight"], straight_weights[-1]["0.weight"])


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (1, "fp32"), (0, "fp16"), (1, "fp16")])
def test_nonfinite_gradient_skips_the_step(resume_runs, zero, precision):
    straight, _ = resume_runs("sgd", zero, precision)
    steps = json.loads((straight / "outcomes.json").read_text())
    weights = load_weights(straight)
    bad = steps[INF_AT]
    assert bad["found_inf"] and not bad["stepped"]
    assert_bit_identical(params_only(weights[INF_AT + 1]), params_only(weights[INF_AT]))
    good = [s for i, s in enumerate(steps) if i != INF_AT]
    assert all(s["stepped"] and not s["found_inf"] for s in good)
    assert not torch.equal(weights[INF_AT + 2]["0.weight"], weights[INF_AT + 1]["0.weight"])
    if precision == "fp16":  # dynamic scaling: halved on the overflow, regrown after the window
        assert bad["scale_after"] == bad["scale_before"] / 2
        assert max(s["scale_after"] for s in steps[INF_AT + 1:]) == bad["scale_before"]


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory) -> Path:
    """ZeRO 0 and 1, each with 2 accumulated micro-batches of 4 and with one micro-batch of 8; one process pair."""
    root = tmp_path_factory.mktemp("ds_accumulation")
    cases = [arg for zero in (0, 1) for name, micro, accum in (("accum2", 4, 2), ("accum1", 8, 1))
             for arg in ("--case", f"{name}-z{zero}=--zero {zero} --micro {micro} --accum {accum}")]
    # No BatchNorm: BN statistics over 4 samples differ from those over 8, so only a BN-free model has
    # the same gradients either way.
    run_ranks(root, 2, "--steps", 3, "--no-bn", *cases)
    return root


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("zero", [0, 1])
def test_accumulation_matches_one_double_micro_batch(accumulation_runs, zero):
    accumulated = load_weights(accumulation_runs / f"accum2-z{zero}")[-1]
    single_run = load_weights(accumulation_runs / f"accum1-z{zero}")
    single = single_run[-1]
    for name in single:
        torch.testing.assert_close(accumulated[name], single[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(single_run[0]["0.weight"], single["0.weight"])


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero1_resume_on_another_world_size_names_both_sizes(resume_runs, tmp_path):
    straight, _ = resume_runs("sgd", 1, "fp32")
    codes = run_ranks(tmp_path, 1, "--steps", 1, "--zero", 1, "--resume", straight / f"at{SAVE_AT}",
                      expect_ok=False)
    assert codes != [0]
    message = (tmp_path / "error0.txt").read_text()
    assert "saved with world size 2" in message and "this run has world size 1" in message


@pytest.mark.deepspeed
def test_config_matches_the_run_shape():
    config = deepspeed_config(world_size=4, precision_dtype="bf16", zero_stage=1, micro_batch_per_gpu=8,
                              accumulation_steps=2, clip_grad_norm=1.0)
    assert config["train_batch_size"] == 64
    assert config["zero_optimization"] == {"stage": 1, "elastic_checkpoint": False}
    assert config["gradient_clipping"] == 1.0
    # bf16 = fp32 weights + DeepSpeed-driven autocast; no module-wide bf16 cast, no bf16 gradient reduction
    assert "bf16" not in config
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


@pytest.mark.deepspeed
def test_config_fp16_loss_scaling():
    dynamic = deepspeed_config(world_size=1, precision_dtype="fp16", init_scale=2.0**12, growth_interval=500)
    assert dynamic["fp16"]["loss_scale"] == 0 and dynamic["fp16"]["initial_scale_power"] == 12
    assert dynamic["fp16"]["loss_scale_window"] == 500 and dynamic["fp16"]["hysteresis"] == 1
    assert dynamic["data_types"]["buffer_dtype"] == "fp16"
    static = deepspeed_config(world_size=1, precision_dtype="fp16", fp16_dynamic=False, static_scale=128.0)
    assert static["fp16"]["loss_scale"] == 128.0
    with pytest.raises(ValueError, match="init_scale must be a power of two"):
        deepspeed_config(world_size=1, precision_dtype="fp16", init_scale=1000.0)


@pytest.mark.deepspeed
@pytest.mark.parametrize("kwargs,name", [({"zero_stage": 2}, "zero_stage"),
                                         ({"precision_dtype": "fp8"}, "precision_dtype"),
                                         ({"accumulation_steps": 0}, "accumulation_steps")])
def test_config_rejects_bad_values_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        deepspeed_config(world_size=2, **kwargs)


def test_weights_only_safe_names_the_offending_entry():
    import enum

    class Stage(enum.IntEnum):
        ONE = 1

    safe = weights_only_safe({"stage": Stage.ONE, "groups": [torch.ones(2, requires_grad=True)]}, "zero")
    assert safe["stage"] == 1 and type(safe["stage"]) is int
    assert not safe["groups"][0].requires_grad
    with pytest.raises(TypeError, match=r"zero\.mappings\[0\]"):
        weights_only_safe({"mappings": [object()]}, "zero")
