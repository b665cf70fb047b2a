"""``kvmpfn replay --timeline out.json``: the replay as Chrome trace-event JSON, which Perfetto
(ui.perfetto.dev) and chrome://tracing open.

One process (the VM); one thread per vcpu, where each event is a complete slice (``ph: "X"``) named after its
op with its result as category; a "VM" thread for the events of no vcpu (memslot, host_remap, audit, ...);
counter tracks (``ph: "C"``) for referenced frames, live sptes and shadow pages, written when they change; an
instant (``ph: "i"``) at each finding. The time axis is the event number: event ``seq`` starts at ``seq`` µs
and lasts 1 µs (wall time would make the file differ between runs). The file is written as the replay goes,
one event per line, so its size does not grow memory.
"""

from __future__ import annotations

import json
from typing import IO

PID = 1
VM_TID = 0
VM_OPS = frozenset({"memslot", "dirty_log", "host_remap", "inject", "audit", "teardown"})


def _dump(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class TimelineWriter:
    """Streams trace events to ``out``; :meth:`close` ends the document."""

    def __init__(self, out: IO[str], title: str) -> None:
        self.out = out
        self.threads: set[int] = set()
        self.sep = ""
        out.write('{"displayTimeUnit":"ns","traceEvents":[\n')
        self._write({"args": {"name": title}, "name": "process_name", "ph": "M", "pid": PID, "tid": VM_TID, "ts": 0})
        self._thread(VM_TID, "VM")

    def _write(self, obj: dict) -> None:
        self.out.write(self.sep + _dump(obj))
        self.sep = ",\n"

    def _thread(self, tid: int, name: str) -> None:
        self.threads.add(tid)
        self._write({"args": {"name": name}, "name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "ts": 0})
        self._write(
            {"args": {"sort_index": tid}, "name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "ts": 0}
        )

    def event(self, seq: int, line: int, op: str, vcpu: int, rec: dict) -> None:
        """One slice. Written by hand, not by json.dumps (a third of the cost): op and result are identifiers,
        the other values numbers and hex strings, and the keys stay in sorted order as json.dumps would put
        them."""
        tid = VM_TID if op in VM_OPS else vcpu + 1
        if tid not in self.threads:
            self._thread(tid, f"vcpu {vcpu}")
        result = rec["result"]
        args = f'"gpa":"{rec["gpa"]}",' if "gpa" in rec else ""
        args += f'"line":{line},'
        if "pfn" in rec:
            args += f'"pfn":"{rec["pfn"]}",'
        args += f'"result":"{result}","seq":{seq}'
        if "spte" in rec:
            args += f',"spte":"{rec["spte"]}"'
        self.out.write(
            f',\n{{"args":{{{args}}},"cat":"{op}","dur":1,"name":"{op} {result}","ph":"X","pid":{PID},'
            f'"tid":{tid},"ts":{seq}}}'
        )

    def counter(self, seq: int, name: str, value: int) -> None:
        self.out.write(
            f',\n{{"args":{{"value":{value}}},"name":"{name}","ph":"C","pid":{PID},"tid":{VM_TID},"ts":{seq}}}'
        )

    def instant(self, seq: int, finding: dict) -> None:
        args = {k: v for k, v in finding.items() if k != "provenance"}
        name = finding["code"]
        self._write({"args": args, "name": name, "ph": "i", "pid": PID, "s": "g", "tid": VM_TID, "ts": seq})

    def close(self) -> None:
        self.out.write("\n]}\n")
