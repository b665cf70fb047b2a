"""How many generated traces the property and fuzz tests ran in this process, by family.

Each generated trace's check calls :func:`generated` once it is done, so the count is of traces actually
replayed and checked. conftest.py adds up the counts of the xdist workers and prints the total.
"""

from __future__ import annotations

from collections import Counter

GENERATED: Counter[str] = Counter()


def generated(family: str) -> None:
    """One generated trace of ``family`` was replayed and passed its checks."""
    GENERATED[family] += 1
