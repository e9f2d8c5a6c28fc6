"""Private: one function of the process's C library, through ctypes."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from typing import Any


def function(name: str, argtypes: list[Any], restype: Any) -> Callable[..., int] | None:
    """The C library's ``name`` with its argument and result types set, or None where the C
    library has none (``malloc_trim`` off glibc) or ctypes cannot load it. The library is the
    process's own (``CDLL(None)``), ``msvcrt`` on Windows. ctypes releases the interpreter's
    lock for the call."""
    try:
        lib = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
        fn = getattr(lib, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    call: Callable[..., int] = fn
    return call
