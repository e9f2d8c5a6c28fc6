"""Print one of README.md's two set-up commands, so that CI runs them exactly as written.

    python3 .ci/readme_command.py 1            # command 1, whole
    python3 .ci/readme_command.py 1 --install  # command 1 up to its last ' && ' (the install)
    python3 .ci/readme_command.py 1 --run      # command 1 after its last ' && ' (the run)

A command is the fenced bash block between ``<!-- command-N -->`` and ``<!-- /command-N -->``.
Exits 1, naming what is missing, when the README has lost it. Standard library only: CI runs it
before any virtualenv exists.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def command(text: str, n: int) -> str:
    """The command of block ``n``, backslash line continuations joined."""
    pattern = rf"<!-- command-{n} -->\n```bash\n(.*?)\n```\n<!-- /command-{n} -->"
    match = re.search(pattern, text, flags=re.DOTALL)
    if match is None:
        raise LookupError(
            f"README.md has no set-up command {n} (a ```bash block between "
            f"<!-- command-{n} --> and <!-- /command-{n} -->)"
        )
    return match.group(1).replace("\\\n", " ").strip()


def split(cmd: str) -> tuple[str, str]:
    """``(install, run)``: the command before and after its last ``' && '``."""
    install, sep, run = cmd.rpartition(" && ")
    if not sep:
        raise LookupError(f"command {cmd!r} has no ' && ' between its install and its run")
    return install, run


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("1", "2") or argv[1:] not in ([], ["--install"], ["--run"]):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        cmd = command(README.read_text(encoding="utf-8"), int(argv[0]))
        if argv[1:]:
            cmd = split(cmd)[0 if argv[1] == "--install" else 1]
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
