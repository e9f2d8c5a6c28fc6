"""``python -m benchmarks``: the command-line entry point (see :mod:`benchmarks.run`)."""

from benchmarks.run import main

raise SystemExit(main())
