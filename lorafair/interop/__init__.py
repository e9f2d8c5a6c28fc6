"""Adapters between lorafair and other libraries.

:mod:`lorafair.interop.peft` converts peft adapter state dicts (no import of peft needed);
:mod:`lorafair.flower` (a sibling module, needs the ``flower`` extra) is a Flower strategy.
Nothing here is imported by ``import lorafair``.
"""

from __future__ import annotations

__all__: list[str] = []
