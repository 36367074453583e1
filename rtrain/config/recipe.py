"""The recipe: one YAML file = one run. Loading, dotted overrides, cross-field checks, YAML round trip."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from rtrain.config.named import recipe_path
from rtrain.config.redact import drop_redacted, redact_tree
from rtrain.config.sections import (
    AnalysisConfig,
    CheckpointConfig,
    DataConfig,
    DistConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    PrecisionConfig,
    RunConfig,
    ScheduleConfig,
    Section,
    TrackingConfig,
    TrainConfig,
    dali_problems,
)

RECIPE_VERSION = 1


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the dotted key and the bad value."""


def _fail(key: str, value: Any, why: str) -> None:
    raise ValueError(f"{key}={value!r}: {why}")


class Recipe(Section):
    version: int = Field(RECIPE_VERSION, description="Recipe format version.")
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        _check_batch(self)
        _check_optim(self)
        _check_precision_and_devices(self)
        _check_schedule(self)
        return self

    # Derived values: pure functions of the recipe, so every rank computes the same.
    @property
    def per_worker_batch(self) -> int:
        return self.train.global_batch // self.dist.num_workers

    @property
    def micro_batch(self) -> int:
        return self.per_worker_batch // self.train.accumulation_steps

    @property
    def peak_lr(self) -> float:
        return self.optim.peak_lr(self.train.global_batch)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_root) / self.run.name

    @property
    def checkpoint_dir(self) -> Path:
        if self.checkpoint.dir and "://" in self.checkpoint.dir:
            return self.checkpoint.dir  # type: ignore[return-value]  # an object store: rtrain.checkpoint.remote
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def to_yaml(self, secrets: bool = False) -> str:
        """The recipe as YAML, fit to be written down (credentials redacted: rtrain.config.redact); with
        `secrets` the real values, for handing the recipe to the run's own workers only."""
        return yaml.safe_dump(self.model_dump(mode="json") if secrets else self.record(), sort_keys=False)

    def record(self) -> dict[str, Any]:
        """The recipe as a JSON-like tree with credentials redacted: what MLflow, checkpoints and logs get."""
        return redact_tree(self.model_dump(mode="json"))

    def with_overrides(self, overrides: list[str]) -> "Recipe":
        return recipe_from_dict(apply_overrides(self.model_dump(mode="json"), overrides), where="overrides")


def _check_batch(r: Recipe) -> None:
    workers, accum = r.dist.num_workers, r.train.accumulation_steps
    if r.train.global_batch % (workers * accum):
        _fail("train.global_batch", r.train.global_batch,
              f"not divisible by dist.num_workers x train.accumulation_steps = {workers} x {accum}")
    if r.dist.bn_group_size is not None and workers % r.dist.bn_group_size:
        _fail("dist.bn_group_size", r.dist.bn_group_size, f"does not divide dist.num_workers={workers}")
    if r.dist.bn_group_size is not None and r.dist.syncbn == "off":
        _fail("dist.bn_group_size", r.dist.bn_group_size, "set dist.syncbn to use BN groups")


def _check_optim(r: Recipe) -> None:
    o = r.optim
    if o.name in ("lars", "lamb") and not o.exclude_bn_bias:
        _fail("optim.exclude_bn_bias", o.exclude_bn_bias,
              f"{o.name} needs BN and bias parameters excluded from adaptation and weight decay")
    if o.fused and o.name not in ("sgd", "adamw"):
        _fail("optim.fused", o.fused, f"torch has fused kernels for sgd and adamw, not {o.name}")
    if o.fused and o.impl != "torch":
        _fail("optim.fused", o.fused, f"fused selects torch kernels; optim.impl is {o.impl}")
    if r.dist.engine == "deepspeed" and o.impl == "apex":
        _fail("optim.impl", o.impl, "apex optimizers are not supported under dist.engine=deepspeed")


def _check_precision_and_devices(r: Recipe) -> None:
    p, d = r.precision, r.dist
    if p.dtype == "fp16" and p.scaler == "none":
        _fail("precision.scaler", p.scaler, "fp16 needs a loss scaler (dynamic or static)")
    if p.dtype != "fp16" and p.scaler != "none":
        _fail("precision.scaler", p.scaler, f"loss scaling is for fp16, precision.dtype is {p.dtype}")
    if d.syncbn in ("torch", "apex") and not d.use_gpu:
        _fail("dist.syncbn", d.syncbn, "needs CUDA (dist.use_gpu=true); use syncbn=rtrain on CPU")
    if r.data.backend == "dali" and not d.use_gpu:
        _fail("data.backend", r.data.backend, "DALI decodes on the GPU: needs dist.use_gpu=true")
    if r.data.backend == "dali" and dali_problems(r.data):
        _fail("data.backend", r.data.backend, "not with " + "; ".join(dali_problems(r.data)))
    if d.engine != "deepspeed" and d.zero_stage != 0:
        _fail("dist.zero_stage", d.zero_stage, "ZeRO stages need dist.engine=deepspeed")
    if r.data.scale_min > r.data.scale_max:
        _fail("data.scale_min", r.data.scale_min, f"greater than data.scale_max={r.data.scale_max}")


def _check_schedule(r: Recipe) -> None:
    s = r.schedule
    if s.kind != "step" and (s.milestones_epochs or s.milestones_steps):
        _fail("schedule.milestones_epochs", s.milestones_epochs or s.milestones_steps,
              f"milestones are for schedule.kind=step, not {s.kind}")
    for key, seq in (("schedule.milestones_epochs", s.milestones_epochs),
                     ("schedule.milestones_steps", s.milestones_steps or [])):
        if list(seq) != sorted(seq) or len(set(seq)) != len(seq):
            _fail(key, seq, "must be strictly increasing")
    if s.milestones_epochs and s.milestones_epochs[-1] >= r.train.epochs:
        _fail("schedule.milestones_epochs", s.milestones_epochs, f"past train.epochs={r.train.epochs}")
    if s.warmup_steps is None and s.warmup_epochs >= r.train.epochs:
        _fail("schedule.warmup_epochs", s.warmup_epochs, f"not shorter than train.epochs={r.train.epochs}")
    if s.kind in ("cosine", "poly") and s.end_lr >= r.peak_lr:
        _fail("schedule.end_lr", s.end_lr, f"not below the peak lr {r.peak_lr}")


def _parse_value(text: str) -> Any:
    """YAML-typed override values; PyYAML reads `1e-4` as a string, so try float too."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# Keys that say the same thing two ways: an override of one drops the other, unless both are overridden.
_ALTERNATIVES = (("optim", "lr", "base_lr_per_256"),)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of raw with `a.b.c=value` overrides applied (values typed like YAML)."""
    result = copy.deepcopy(raw)
    keys = {item.partition("=")[0].strip() for item in overrides}
    for section, first, second in _ALTERNATIVES:
        for given, other in ((first, second), (second, first)):
            node = result.get(section)
            if f"{section}.{given}" in keys and f"{section}.{other}" not in keys and isinstance(node, dict):
                node.pop(other, None)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r}: expected key.sub=value")
        parts = key.strip().split(".")
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:  # an optional section that is off: a key under it switches it on
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(text)
    return result


def _unknown_key(loc: tuple[str, ...], given: Any) -> str:
    """What a key the schema does not have gets: the closest valid key, and every valid key of its section."""
    import difflib

    from rtrain.config.reference import section_keys

    valid = section_keys(loc[:-1]) or []
    where = ".".join(loc[:-1]) or "the recipe's top level"
    close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
    hint = f"did you mean {'.'.join((*loc[:-1], close[0]))}? " if close else ""
    shown = repr(given) if len(repr(given)) <= 80 else repr(given)[:77] + "..."
    return (f"not a recipe key (got {shown}); {hint}valid keys of {where}: {', '.join(valid)} (`rtrain recipe-keys` "
            "lists them all)")


def _format_errors(exc: ValidationError, where: str) -> str:
    """One line per problem, `WHERE: KEY: why (got VALUE)`: the CLIs print each as one `rtrain: ...` line."""
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc:
            lines.append(f"{where}: {key}: {_unknown_key(loc, err.get('input'))}")
        elif key:
            shown = err.get("input")
            extra = "" if msg.startswith(key) else f" (got {shown!r})"
            lines.append(f"{where}: {key}: {msg}{extra}")
        else:
            lines.append(f"{where}: {msg}")
    return "\n".join(lines)


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping of sections, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, where)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe in file `path`, or the packaged recipe of that name (rtrain.config.named), with overrides."""
    path = recipe_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        hint = "" if "/" in str(path) or path.suffix else "; `rtrain recipes` lists the packaged recipes by name"
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror}){hint}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections, got {type(raw).__name__}")
    # A recorded recipe (resolved_recipe.yaml) holds *** for credentials: those come from the environment or
    # the overrides instead.
    return recipe_from_dict(apply_overrides(drop_redacted(raw), overrides or []), where=str(path))


def loads_recipe(text: str, where: str = "recipe") -> Recipe:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: not valid YAML ({exc})") from None
    return recipe_from_dict(drop_redacted(raw or {}), where=where)
