"""``python -m lorafair.bench``: ``lorafair bench`` on its own (see :mod:`lorafair.bench.cli`)."""

from lorafair.bench.cli import main

raise SystemExit(main())
