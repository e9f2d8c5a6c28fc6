"""``python -m lorafair``: the ``lorafair`` command."""

from __future__ import annotations

from lorafair.cli import main

raise SystemExit(main())
