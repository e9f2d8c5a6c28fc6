"""``python -m benchmarks``: the command-line entry point (see :mod:`benchmarks.cli`)."""

from benchmarks.cli import main

raise SystemExit(main())
