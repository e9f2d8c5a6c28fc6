"""README.md's front page: what lorafair is, then the two set-up commands CI runs as written."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
FIRST_SCREEN = 50  # lines


def _parser() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "readme_command", ROOT / ".ci" / "readme_command.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_front_page_opens_with_the_library_and_one_paragraph() -> None:
    lines = README.splitlines()
    assert lines[0] == "# lorafair"
    assert lines[1] == ""
    setup = lines.index("## Set-up")
    paragraph = lines[2:setup]
    assert paragraph[-1] == ""
    assert "" not in paragraph[:-1], "one paragraph between the title and Set-up"


@pytest.mark.parametrize("n", [1, 2])
def test_both_commands_are_on_the_first_screen(n: int) -> None:
    end = README.index(f"<!-- /command-{n} -->")
    assert README[:end].count("\n") < FIRST_SCREEN


def test_command_1_installs_and_runs_the_offline_example() -> None:
    rc = _parser()
    install, run = rc.split(rc.command(README, 1))
    assert "torch==2.14.1" in install
    assert "torchvision==0.29.1" in install
    assert '-e ".[examples]"' in install
    assert run.endswith("python -m examples.federated")


def test_command_2_installs_and_runs_the_tests() -> None:
    rc = _parser()
    install, run = rc.split(rc.command(README, 2))
    assert "torch==2.13.0" in install
    assert '-e ".[dev]"' in install
    assert run.endswith("python -m pytest")


def test_a_lost_command_is_an_error() -> None:
    rc = _parser()
    broken = README.replace("<!-- command-2 -->", "")
    with pytest.raises(LookupError, match="no set-up command 2"):
        rc.command(broken, 2)


def test_ci_runs_the_commands_from_the_readme() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'readme() { python3 .ci/readme_command.py "$@"; }' in ci
    for line in ("cmd2=$(readme 2)", 'bash -c "$cmd2"', "cmd1=$(readme 1)", 'bash -c "$cmd1"'):
        assert line in ci


def test_no_relative_links_that_break_on_a_package_index() -> None:
    links = re.findall(r"\]\(([^)]+)\)", README)
    relative = [u for u in links if not re.match(r"(https?://|#)", u)]
    assert relative == []
