from pathlib import Path

import pytest

from rtrain.config import Recipe, RecipeError, apply_overrides, load_recipe, loads_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def _recipe(*overrides: str) -> Recipe:
    return Recipe().with_overrides(list(overrides))


def _error(*overrides: str) -> str:
    with pytest.raises(RecipeError) as info:
        _recipe(*overrides)
    return str(info.value)


def test_defaults_are_valid_and_derived_values():
    r = Recipe()
    assert r.peak_lr == pytest.approx(0.1)
    assert r.per_worker_batch == 256
    r = _recipe("train.global_batch=1024", "dist.num_workers=4", "train.accumulation_steps=2")
    assert (r.per_worker_batch, r.micro_batch, r.peak_lr) == (256, 128, pytest.approx(0.4))


def test_override_typing():
    r = _recipe("optim.lr=1e-4", "optim.base_lr_per_256=null", "train.compile=true",
                "schedule.milestones_epochs=[30, 60]", "model.checkpoint_stages=[1,2]",
                "run.name=exp-7", "dist.num_workers=2", "train.global_batch=512",
                "data.rrc_scale=[0.25, 1]", "tracking.tags={team: vision}")
    assert r.optim.lr == pytest.approx(1e-4) and r.optim.base_lr_per_256 is None
    assert r.train.compile is True
    assert r.schedule.milestones_epochs == [30.0, 60.0]
    assert r.model.checkpoint_stages == [1, 2]
    assert r.run.name == "exp-7" and r.dist.num_workers == 2
    assert r.data.rrc_scale == (0.25, 1.0)
    assert r.tracking.tags == {"team": "vision"}


def test_overrides_do_not_mutate_input():
    raw = {"optim": {"lr": 0.1}}
    out = apply_overrides(raw, ["optim.lr=0.2", "train.epochs=3"])
    assert raw == {"optim": {"lr": 0.1}} and out["optim"]["lr"] == 0.2 and out["train"]["epochs"] == 3


@pytest.mark.parametrize("override", ["optim", "=3", "optim.lr"])
def test_malformed_override(override):
    assert "override" in _error(override)


def test_override_into_a_value_is_refused():
    assert "run.name is not a section" in _error("run.name.first=3")


@pytest.mark.parametrize("override,key", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("nosuch.section=1", "nosuch"),
    ("optim.lr=abc", "optim.lr"),
    ("train.global_batch=-4", "train.global_batch"),
    ("precision.dtype=fp8", "precision.dtype"),
    ("model.shortcut=D", "model.shortcut"),
    ("dist.zero_stage=3", "dist.zero_stage"),
])
def test_field_errors_name_the_dotted_key(override, key):
    message = _error(override)
    assert key in message
    value = override.split("=", 1)[1]
    assert value in message


def test_frozen_after_validation():
    r = Recipe()
    with pytest.raises(Exception):
        r.optim.lr = 3.0  # type: ignore[misc]


@pytest.mark.parametrize("overrides,key", [
    (["train.global_batch=250", "dist.num_workers=4"], "train.global_batch"),
    (["train.global_batch=256", "dist.num_workers=2", "train.accumulation_steps=3"], "train.global_batch"),
    (["optim.lr=0.5", "optim.base_lr_per_256=0.2"], "optim.lr"),
    (["optim.base_lr_per_256=null"], "optim.lr"),
    (["optim.name=lars", "optim.exclude_bn_bias=false"], "optim.exclude_bn_bias"),
    (["optim.name=lars", "optim.fused=true"], "optim.fused"),
    (["precision.dtype=fp16"], "precision.scaler"),
    (["precision.scaler=dynamic"], "precision.scaler"),
    (["dist.syncbn=torch"], "dist.syncbn"),
    (["data.backend=dali"], "data.backend"),
    (["dist.zero_stage=1"], "dist.zero_stage"),
    (["dist.num_workers=4", "train.global_batch=256", "dist.syncbn=rtrain", "dist.bn_group_size=3"],
     "dist.bn_group_size"),
    (["dist.num_workers=2", "dist.bn_group_size=2"], "dist.bn_group_size"),
    (["schedule.milestones_epochs=[60, 30]"], "schedule.milestones_epochs"),
    (["schedule.milestones_epochs=[30, 95]"], "schedule.milestones_epochs"),
    (["schedule.kind=cosine", "schedule.milestones_epochs=[30]"], "schedule.milestones_epochs"),
    (["schedule.warmup_epochs=100"], "schedule.warmup_epochs"),
    (["schedule.kind=poly", "schedule.end_lr=5"], "schedule.end_lr"),
    (["data.scale_min=500"], "data.scale_min"),
])
def test_cross_field_errors(overrides, key):
    assert key in _error(*overrides)


def test_learning_rate_is_given_one_way():
    assert _recipe("optim.lr=0.5").peak_lr == pytest.approx(0.5)  # replaces the default scaling rule
    r = loads_recipe("optim: {lr: 0.3}\ntrain: {global_batch: 512}\n")
    assert (r.optim.lr, r.optim.base_lr_per_256, r.peak_lr) == (0.3, None, 0.3)
    r = loads_recipe("optim: {base_lr_per_256: 0.2}\ntrain: {global_batch: 512}\n")
    assert r.peak_lr == pytest.approx(0.4) and r.with_overrides(["optim.lr=0.7"]).peak_lr == 0.7
    assert "not both" in str(pytest.raises(RecipeError, loads_recipe, "optim: {lr: 0.3, base_lr_per_256: 0.1}"
                                                                      ).value)


def test_dali_combinations_are_refused_by_the_schema():
    message = _error("data.backend=dali", "dist.use_gpu=true", "data.augment=cifar", "data.on_bad_sample=raise")
    assert "data.augment" in message and "data.on_bad_sample" not in message
    assert _recipe("data.backend=dali", "dist.use_gpu=true", "data.on_bad_sample=raise").data.backend == "dali"


def test_fp16_with_scaler_and_deepspeed_zero_are_valid():
    r = _recipe("precision.dtype=fp16", "precision.scaler=dynamic", "dist.engine=deepspeed", "dist.zero_stage=1")
    assert r.precision.scaler == "dynamic" and r.dist.zero_stage == 1


def test_yaml_round_trip(tmp_path):
    r = _recipe("optim.name=lars", "schedule.kind=poly", "schedule.end_lr=1e-4", "model.name=resnet152",
                "tracking.tags={a: b}", "eval.scales=[224, 256]")
    again = loads_recipe(r.to_yaml())
    assert again == r
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    assert load_recipe(path) == r


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="YAML mapping"):
        load_recipe(bad)
    bad.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: optim.momentun: not a recipe key \(got 0.9\); "
                       r"did you mean optim.momentum\?"):
        load_recipe(bad)


def test_empty_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_recipe(path) == Recipe()


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert loads_recipe(recipe.to_yaml()) == recipe


def test_credentials_are_redacted_wherever_they_sit_in_a_line():
    """Cases a review found leaking: an @ in the password, several URLs in one error line, fragments,
    ';' separators, a secret key holding a list or a mapping."""
    from rtrain.config.redact import redact_tree, redact_url

    assert redact_url("https://user:p@S3CR3T@host/x") == "https://***@host/x"
    line = "GET https://h/a?x=1\nthen https://h/b?token=S3CR3T#access_token=T0K and s3://b/c?a=b;sig=Z"
    assert redact_url(line) == ("GET https://h/a?x=1\nthen https://h/b?token=***#access_token=*** and "
                                "s3://b/c?a=b;sig=***")
    assert redact_tree({"password": ["S"], "token": {"value": "S"}}) == {"password": ["***"],
                                                                         "token": {"value": "***"}}


@pytest.mark.parametrize("override,key", [
    ("run.output_root=s3://bucket/runs", "run.output_root"),
    ("run.output_root=file:///tmp/runs", "run.output_root"),
])
def test_url_run_outputs_are_refused_not_written_to_a_local_folder_named_s3(override, key):
    # Before: such a root trained to exit 0 with every output in ./s3:/bucket/runs.
    message = _error(override)
    assert f"{key}: an object-store or other URL is not supported for run outputs yet" in message


def test_checkpoint_dir_may_be_a_bucket_with_a_prefix():
    recipe = loads_recipe("checkpoint: {dir: 's3://bucket/run/checkpoints'}")
    assert recipe.checkpoint_dir == "s3://bucket/run/checkpoints"  # rtrain.checkpoint.remote, not a Path
    assert "checkpoint.dir: an object-store URL needs a bucket" in _error("checkpoint.dir=s3://")
    assert loads_recipe("checkpoint: {dir: /tmp/ckpt}").checkpoint_dir == Path("/tmp/ckpt")
