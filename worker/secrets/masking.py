"""Masks resolved secret values in everything an attempt sends back or the agent logs.

Every value the agent resolves is registered here, and every occurrence of it (plainly, as
written inside a JSON string, as inside a Python ``repr`` and base64-encoded) is replaced by
``***`` in events (results, error messages, tracebacks, output tails), in the agent's log lines
and in the output of its child processes. The masker only ever grows: a value stays masked for
the agent's life, even after the cache forgot it. Use ``Masker.mask(text)`` for anything else
that leaves the agent (per-attempt task logs, say).
"""

from __future__ import annotations

import base64
import logging
import re

import msgspec

MASK = "***"

_json = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def _forms(value: str) -> set[str]:
    raw = {value, repr(value)[1:-1], base64.b64encode(value.encode()).decode()}
    forms = set(raw)
    for form in raw:
        forms.add(_json.encode(form).decode()[1:-1])
    return {f for f in forms if f}


class Masker:
    def __init__(self) -> None:
        self._forms: set[str] = set()
        self._text: re.Pattern[str] | None = None
        self._bytes: re.Pattern[bytes] | None = None

    def __len__(self) -> int:
        return len(self._forms)

    def __bool__(self) -> bool:
        return True  # an empty masker is still a masker: ``masker or Masker()`` must keep it

    def add(self, value: str) -> None:
        """Mask ``value`` from now on (an empty value cannot be masked and is ignored)."""
        if not value:
            return
        new = _forms(value) - self._forms
        if not new:
            return
        forms = self._forms | new
        # Longest first: a value that contains another is masked whole.
        ordered = sorted(forms, key=len, reverse=True)
        text = re.compile("|".join(re.escape(f) for f in ordered))
        data = re.compile(b"|".join(re.escape(f.encode()) for f in ordered))
        self._forms, self._text, self._bytes = forms, text, data

    def mask(self, text: str) -> str:
        pattern = self._text
        return text if pattern is None else pattern.sub(MASK, text)

    def mask_bytes(self, data: bytes) -> bytes:
        pattern = self._bytes
        return data if pattern is None else pattern.sub(MASK.encode(), data)

    def mask_json(self, raw: bytes) -> bytes:
        """Mask a JSON document and keep it valid JSON (a masked bare number becomes a string)."""
        masked = self.mask_bytes(raw)
        if masked == raw:
            return raw
        try:
            _decoder.decode(masked)
        except msgspec.DecodeError:
            return _json.encode(self.mask(raw.decode(errors="replace")))
        return masked


class MaskingFormatter(logging.Formatter):
    """Wraps a handler's formatter: the finished line is masked, whatever produced it."""

    def __init__(self, inner: logging.Formatter | None, masker: Masker) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.masker = masker

    def format(self, record: logging.LogRecord) -> str:
        return self.masker.mask(self.inner.format(record))


def mask_logs(masker: Masker, logger: logging.Logger | None = None) -> None:
    """Mask every line the handlers of ``logger`` (the root logger) write."""
    for handler in (logger or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, MaskingFormatter):
            handler.setFormatter(MaskingFormatter(handler.formatter, masker))
