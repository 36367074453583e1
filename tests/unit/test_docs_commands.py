"""The docs tell the truth about the command line: every command in a README.md or docs/*.md command block
names a real program, subcommand and flags (checked against the parsers themselves), real make targets, real
sbatch scripts and recipes; and the site builds with `mkdocs build --strict` (a broken link or a page missing
from the nav fails)."""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

from rtrain import cli
from rtrain.config.named import find_recipe

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").rglob("*.md") if "reference" not in p.parts)]
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
FENCE = re.compile(r"^```([\w-]*)\s*$")


def command_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, command) for each command in the page's shell blocks: comments, prompts and line
    continuations handled."""
    found, block, pending, start = [], None, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = FENCE.match(line.strip())
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        if block is None or block not in SHELL_BLOCKS:
            continue
        text = re.sub(r"(^|\s)#.*$", "", line).strip().removeprefix("$ ")
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text, pending = (pending + text).strip(), ""
        if text:
            found.append((start, text))
    return found


@functools.cache
def rtrain_flags() -> dict[str, set[str]]:
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    return {name: {o for a in sub._actions for o in a.option_strings} for name, sub in commands.items()}  # noqa: SLF001


@functools.cache
def module_flags(module: str, sub: str = "") -> frozenset[str] | None:
    argv = [sys.executable, "-m", module, *([sub] if sub else []), "--help"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    return frozenset(re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", done.stdout)) if done.returncode == 0 else None


def _words(command: str) -> list[str]:
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before the program
        words.pop(0)
    return words


def _flags(words: list[str]) -> list[str]:
    cleaned = [w.strip("[](){}|,") for w in words]
    return [w.split("=", 1)[0] for w in cleaned if re.fullmatch(r"--?[a-zA-Z][\w-]*(=.*)?", w)]


def problems_of(command: str) -> list[str]:
    words = _words(command)
    if not words:
        return []
    program = words[0]
    if program == "ray" and "--" in words:
        return problems_of(shlex.join(words[words.index("--") + 1:]))
    if program == "rtrain":
        if len(words) == 1 or words[1] in ("--help", "-h", "--version"):
            return []
        sub = words[1]
        if sub not in rtrain_flags():
            return [f"rtrain has no command {sub!r}"]
        known = rtrain_flags()[sub] | {"-h", "--help"}
        return [f"rtrain {sub} has no flag {f}" for f in _flags(words[2:]) if f not in known]
    if program.startswith("python") and words[1:2] == ["-m"] and len(words) > 2:
        module = words[2]
        if module == "rtrain.launch":
            return problems_of(shlex.join(["rtrain", "launch", *words[3:]]))
        if module == "rtrain.cli":
            return problems_of(shlex.join(["rtrain", *words[3:]]))
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            return [f"no module {module}"] if module.split(".")[0] in ("rtrain", "data_prep", "cluster") else []
        if module.split(".")[0] not in ("rtrain", "data_prep", "cluster"):
            return []
        known = set(module_flags(module) or ())
        if len(words) > 3 and not words[3].startswith("-"):
            known |= set(module_flags(module, words[3]) or ())
        return [f"python -m {module} has no flag {f}" for f in _flags(words[3:]) if f not in known]
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
        return [f"no make target {t!r}" for t in words[1:] if "=" not in t and not t.startswith("-")
                and t not in targets]
    if program == "sbatch":
        scripts = [w for w in words if w.endswith(".sbatch")]
        out = [f"no script {s}" for s in scripts if not (REPO / s).is_file()]
        after = words[words.index(scripts[0]) + 1:] if scripts else []
        if after and "=" not in after[0] and not (REPO / after[0]).exists() and find_recipe(after[0]) is None:
            out.append(f"no recipe {after[0]}")
        return out
    return []


def all_commands() -> list[tuple[str, str]]:
    return [(f"{page.relative_to(REPO)}:{number}", command) for page in PAGES for number, command in
            command_lines(page)]


def test_the_docs_have_command_blocks_to_check():
    commands = all_commands()
    programs = {_words(c)[0] for _, c in commands if _words(c)}
    assert len(commands) > 30 and {"rtrain", "make", "python"} <= programs, programs


def test_every_documented_command_exists_with_its_flags():
    wrong = [f"{where}: {command}\n    {problem}" for where, command in all_commands()
             for problem in problems_of(command)]
    assert not wrong, "\n".join(wrong)


def test_the_checker_catches_what_it_is_for():
    assert problems_of("rtrain launch quickstart --no-such-flag")
    assert problems_of("rtrain lunch quickstart")
    assert problems_of("python -m data_prep.imagenet --src a --out b --shardsize 3")
    assert problems_of("python -m rtrain.launch quickstart --debugg")
    assert problems_of("make tests")
    assert problems_of("sbatch -N 2 cluster/slurm/nope.sbatch quickstart")
    assert problems_of("ray job submit --working-dir . -- rtrain launch quickstart --worker x --bogus")
    assert not problems_of("ray job submit --working-dir . -- python -m rtrain.launch recipes/r152_256gpu.yaml")
    assert not problems_of("rtrain eval RUN [--data DIR] [--mode center|ten_crop|multi_scale] [--batch-size N]")
    assert not problems_of("PIP_EXTRA_INDEX_URL=X make test")


def test_the_site_builds_strict(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "recipe-keys" / "index.html").is_file()


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150
