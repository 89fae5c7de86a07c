"""How deeply JSON may nest where the dispatcher reads it: request bodies, stored rows, results.

Decoding and encoding JSON recurse, so a value nested some hundreds of levels deep raises
``RecursionError`` wherever it is read: a 500 on every request that includes it, or a dead
consumer. So depth is bounded where values arrive, and JSON text is measured before it is
decoded, by a scan of its bytes (brackets outside strings) that never recurses.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Any

MAX_BODY_DEPTH = 64
"""Deepest nesting of arrays and objects in a request body: room for a batch of tasks
(``{"tasks": [{"args": ...}]}``) whose arguments nest as deeply as allowed, and no more."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
"""A JSON string (escapes included): brackets inside one do not nest."""
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
_STEP = tuple(1 if b == ord("[") else -1 if b == ord("]") else 0 for b in range(256))


def text_deeper_than(text: bytes | str, limit: int) -> bool:
    """Whether the JSON ``text`` nests more than ``limit`` levels of arrays and objects.

    Linear and without recursion: strings are cut out, the brackets left are kept, and the
    deepest running count of them is taken (in C: a 56 MB batch of tasks scans in about a
    third of a second, less than decoding it). Malformed JSON may be counted either way; its
    decoding refuses it anyway."""
    data = text.encode() if isinstance(text, str) else text
    if data.count(b"[") + data.count(b"{") <= limit:  # too few brackets to nest that deep
        return False
    if b'"' in data:
        data = _STRING.sub(b"", data)
    brackets = data.translate(_AS_SQUARE, _NOT_BRACKETS)
    if brackets.count(b"[") <= limit:
        return False
    return max(accumulate(map(_STEP.__getitem__, brackets))) > limit


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether the decoded ``value`` nests more than ``limit`` levels of lists (or tuples)
    and dicts; a scalar is 0 levels, ``[]`` one. Breadth first, without recursion, stopping
    at the first level too many."""
    frontier: list[Any] = [value]
    depth = 0
    while True:
        containers = [item for item in frontier if isinstance(item, list | tuple | dict)]
        if not containers:
            return False
        depth += 1
        if depth > limit:
            return True
        frontier = []
        for container in containers:
            frontier.extend(container.values() if isinstance(container, dict) else container)
