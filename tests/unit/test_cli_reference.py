"""The command line and its reference: the pages under docs/reference/ are what the code generates, every recipe
key and RTRAIN_* variable is in them, packaged recipes are found by name, a wrong key names the valid ones, and
every expected failure is one `rtrain: ...` line per problem with exit code 2 (no traceback)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rtrain import cli
from rtrain.commands import help_text, reference
from rtrain.config import RecipeError, load_recipe
from rtrain.config.named import find_recipe, packaged_recipes
from rtrain.config.reference import key_rows, section_keys

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_reference_pages_are_what_the_code_generates():
    assert reference.main(["--check", str(REPO / "docs" / "reference")]) == 0, (
        "run `python -m rtrain.commands.reference` and commit docs/reference/")


def test_every_schema_key_is_in_the_recipe_key_reference():
    page = (REPO / "docs" / "reference" / "recipe-keys.md").read_text()
    rows = key_rows()
    assert len(rows) > 100 and len({r.section for r in rows}) == 13
    missing = [r.key for r in rows if f"| `{r.key}` |" not in page]
    assert not missing
    assert all(r.description for r in rows), [r.key for r in rows if not r.description]


def test_every_rtrain_environment_variable_in_the_sources_is_documented():
    used = set()
    for folder in ("rtrain", "data_prep", "cluster"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".sbatch", ".yaml", ".sh") and path.is_file():
                used |= set(re.findall(r"\bRTRAIN_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    assert used and not used - set(help_text.ENVIRONMENT), sorted(used - set(help_text.ENVIRONMENT))
    page = (REPO / "docs" / "reference" / "environment.md").read_text()
    assert all(f"`{name}`" in page for name in help_text.ENVIRONMENT)


def test_every_command_has_a_description_examples_and_exit_codes_in_its_help(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them there
    assert set(commands) == set(help_text.COMMANDS)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "examples:" in text and "exit codes:" in text and help_text.COMMANDS[name].description[:30] in \
            " ".join(text.split()), name
        for example in help_text.COMMANDS[name].examples:
            assert f"rtrain {name}" in example, example
        undocumented = [a.option_strings or a.dest for a in sub._actions if not a.help]  # noqa: SLF001
        assert not undocumented, (name, undocumented)


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert re.fullmatch(r"rtrain \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_packaged_recipes_by_name(capsys):
    names = [r.name for r in packaged_recipes()]
    assert {"quickstart", "r152_256gpu", "r1202_cifar", "r50_paper", "r50_lars", "degradation/resnet20"} <= set(names)
    assert all(r.purpose.endswith(".") for r in packaged_recipes())
    assert find_recipe("quickstart.yaml") == find_recipe("quickstart") is not None
    assert find_recipe("../quickstart") is None and find_recipe("/etc/passwd") is None
    assert load_recipe("degradation/resnet20").run.name == "resnet20"
    assert cli.main(["recipes"]) == 0
    assert "r152_256gpu" in capsys.readouterr().out


def test_a_wrong_key_names_the_closest_and_the_sections_valid_keys():
    with pytest.raises(RecipeError) as err:
        load_recipe("quickstart", ["optim.lrr=0.1", "modle.name=x"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert "optim.lrr: not a recipe key (got 0.1); did you mean optim.lr? valid keys of optim: name, lr," in lines[0]
    assert "modle: not a recipe key (got {'name': 'x'}); did you mean model?" in lines[1]
    assert section_keys(("analysis", "layer_responses")) == ["every_epochs", "batch_size"]
    assert section_keys(("optim", "lr")) is None


FAILURES = {  # every class of expected failure a command meets before any work
    "unknown key": ["validate", "quickstart", "optim.lrr=1"],
    "bad value": ["validate", "quickstart", "train.epochs=many"],
    "impossible combination": ["validate", "quickstart", "train.global_batch=7", "--schema-only"],
    "bad override": ["validate", "quickstart", "optim.lr"],
    "missing recipe": ["validate", "no-such-recipe"],
    "unknown model": ["validate", "quickstart", "model.name=resnet51", "--schema-only"],
    "missing data": ["validate", "quickstart", "data.source=/nonexistent/shards", "tracking.enabled=false"],
    "launch of a bad recipe": ["launch", "quickstart", "dist.num_workers=0"],
    "bad argument": ["eval", "--mode", "sideways", "x"],
    "missing checkpoint": ["eval", "/nonexistent/run"],
    "missing run directory": ["status", "/nonexistent/run"],
    "unknown section": ["recipe-keys", "--section", "optimizer"],
    "unreadable store": ["compare", "--tracking-uri", "file:///nonexistent/mlruns"],
    "bench of a bad recipe": ["bench", "quickstart", "data.sources=x"],
}


@pytest.mark.parametrize("case", FAILURES)
def test_every_expected_failure_is_one_rtrain_line_per_problem(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(FAILURES[case])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (case, captured.err)
    assert lines and all(line.startswith("rtrain: ") for line in lines), lines
    assert "Traceback" not in captured.err
    assert not list(tmp_path.iterdir()), f"{case} created {list(tmp_path.iterdir())}"


def test_overrides_may_follow_a_flag(capsys):
    assert cli.main(["validate", "quickstart", "--schema-only", "optim.lr=0.05"]) == 0
    assert "lr: 0.05" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["validate", "quickstart", "--schema-only", "optim.lr=0.05", "--bogus"])
    assert capsys.readouterr().err == "rtrain: validate: unrecognized arguments: --bogus (see rtrain validate --help)\n"
