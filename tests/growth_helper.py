"""Traces that make the simulated VM grow with every event, for the memory-limit tests.

``hugetlb_regions``: stores to fresh 2 MiB regions of a hugetlb slot (issue 21: 1.1 MB of it, 17,000 lines,
used to take 2 GiB, 512 frames per line). ``leak_then_growth``: the refcount-leak trace of traces/findings
(under ``--bug same-pfn-no-release`` its ``audit`` finds the leak on line 16), then stores to ``n`` distinct
pages of a second, large slot: about 4 KiB of guest page contents each. ``tdp_faults``: faults on fresh
2 MiB regions of a TDP guest, a shadow page each (or on fresh pages: ``shift`` 12).
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEAK = REPO / "traces" / "findings" / "refcount-leak.jsonl"
LEAK_BUG = "same-pfn-no-release"
#: the line of the leak trace's audit, where the finding is made
LEAK_LINE = 16
WRITE = b'{"op": "write", "gpa": "0x%x", "val": "0x1", "len": 8}\n'
BIG_SLOT = 1 << 28  # pages: 1 TiB of guest memory


def hugetlb_regions(n: int) -> bytes:
    header = {"kvmpfn": 1, "memslots": [{"slot": 0, "gfn": 0, "npages": 1 << 30, "backing": "hugetlb"}]}
    return json.dumps(header).encode() + b"\n" + b"".join(WRITE % (i << 21) for i in range(n))


def leak_then_growth(n: int) -> bytes:
    slot = b'{"op": "memslot", "slot": 1, "gfn": "0x100000", "npages": %d}\n' % (BIG_SLOT - 0x100000)
    return LEAK.read_bytes() + slot + b"".join(WRITE % ((0x100000 + i) << 12) for i in range(n))


def tdp_faults(n: int, shift: int = 21) -> bytes:
    header = {
        "kvmpfn": 1,
        "mmu": "tdp",
        "guest": {"paging": "none"},
        "memslots": [{"slot": 0, "gfn": 0, "npages": BIG_SLOT, "backing": "ram"}],
    }
    pfs = b"".join(b'{"op": "pf", "addr": "0x%x", "err": 2}\n' % (i << shift) for i in range(n))
    return json.dumps(header).encode() + b"\n" + pfs
