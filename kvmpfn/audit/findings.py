"""Findings: stable codes (:data:`kvmpfn.vocab.CODES`; docs/trace-format.md, Findings), one per distinct defect.

A finding is a plain dict, JSON-ready: ``code``, ``seq``/``line`` of the event where it was detected,
``point`` (the audit point or kernel operation that saw it), the subject (``pfn``, ``gfn``, ``addr`` as hex
strings; ``level``, ``slot`` as integers), a one-line ``message`` and ``provenance``: the references or
events behind it (``seq``, ``line``, ``function`` — the pfn API call — and ``caller`` — the MMU function).
"""

from __future__ import annotations

from typing import Any

from kvmpfn import vocab
from kvmpfn.audit.ledger import RefLedger

CODES = tuple(vocab.CODES)


def hexs(value: int) -> str:
    return f"{value:#x}"


class Findings:
    """The findings of one replay, deduplicated by (code, subject)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._seen: set[tuple[object, ...]] = set()
        self.seq = -1
        self.line = 0
        self.point = "setup"
        self.ledger: RefLedger | None = None  # the RefLedger, for the provenance of spte findings

    def report(
        self,
        code: str,
        message: str,
        subject: tuple[object, ...],
        provenance: list[dict[str, Any]] | None = None,
        **fields: Any,
    ) -> bool:
        """Record a finding unless the same code on the same subject was reported before."""
        key = (code, *subject)
        if key in self._seen:
            return False
        self._seen.add(key)
        item: dict[str, Any] = {"code": code, "seq": self.seq, "line": self.line, "point": self.point}
        for name, value in fields.items():
            if value is None:
                continue
            item[name] = hexs(value) if name in ("pfn", "gfn", "addr", "spte", "region") else value
        item["message"] = message
        item["provenance"] = provenance or []
        self.items.append(item)
        return True
