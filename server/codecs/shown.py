"""Client-sent values quoted in error messages, cut to a readable size.

A plain `repr` of a value from a request body can be as large as the body and, for a list
nested a thousand deep, raises RecursionError instead of returning: the error for bad input
must not itself fail or echo megabytes back.
"""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlong = 40


def shown(value: Any) -> str:
    return _REPR.repr(value)
