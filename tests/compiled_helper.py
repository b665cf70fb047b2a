"""Run by tests/test_compiled.py in a child process, once on the compiled simulator and once on the pure-Python
one: replays random guests (hunt's generator, the same seeds in both) under every audit mode and every --bug,
and the corpus, and prints everything they produced (outcome records, findings, errors) as JSON lines."""

from __future__ import annotations

import glob
import io
import json
import random
import sys

from kvmpfn import native
from kvmpfn.hunt import GuestGen
from kvmpfn.kvm.bugs import BUGS
from kvmpfn.reduce import replay_events
from kvmpfn.replay import ReplayOptions, replay_file

MODES = [ReplayOptions(), ReplayOptions(audit_every=1), ReplayOptions(paranoid=True), ReplayOptions(kernel_audit=True)]
MODES += [ReplayOptions(bugs=frozenset({bug}), audit_every=1) for bug in sorted(BUGS)]


def main(traces: int, corpus: str) -> None:
    print(json.dumps({"mode": native.MODE}))
    for seed in range(traces):
        gen = GuestGen(random.Random(f"compiled/{seed}"))
        header = gen.header()
        events = gen.events(header, 40)
        for options in MODES:
            run = replay_events(header, events, options, records=True)
            print(json.dumps([seed, sorted(options.bugs), run.findings, run.records, run.error, run.at], default=repr))
    for path in sorted(glob.glob(f"{corpus}/**/*.jsonl*", recursive=True)):
        for options in MODES[:2]:
            out = io.StringIO()
            result = replay_file(path, options, emit=out)
            print(json.dumps([path, result.findings, result.error, out.getvalue()], default=repr))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
