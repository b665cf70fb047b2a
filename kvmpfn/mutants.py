"""``kvmpfn mutants`` (would this corpus catch the bugs KVM really had?) and ``kvmpfn compare`` (does a change
of kernel, MMU or bug switch alter what the MMU does?). Both replay every trace under two or more option sets
and diff outcome records and findings; traces run in parallel processes, results come back in corpus order.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shlex
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from kvmpfn.kvm.bugs import BUGS
from kvmpfn.replay import ReplayOptions, replay_file


@dataclass
class Run:
    """One replay of one trace: outcome records (as emitted lines), findings by code, input error."""

    records: list[str]
    by_code: dict[str, int]
    error: str | None


def run_trace(path: str, options: ReplayOptions) -> Run:
    """Replay ``path`` under ``options`` and keep what the comparisons need."""
    emit = io.StringIO()
    try:
        result = replay_file(path, options, emit)
        error = result.error
        by_code = dict(sorted(Counter(f["code"] for f in result.findings).items()))
    except Exception as exc:  # a defect in kvmpfn under a mutant is a difference, not a dead run
        if os.environ.get("KVMPFN_DEBUG"):
            raise
        error, by_code = f"internal error: {type(exc).__name__}: {exc}", {}
    return Run(emit.getvalue().splitlines(), by_code, error)


def _run_all(tasks: list[tuple[str, ReplayOptions]], jobs: int) -> list[Run]:
    if jobs <= 1 or len(tasks) <= 1:
        return [run_trace(path, opts) for path, opts in tasks]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(run_trace, [t[0] for t in tasks], [t[1] for t in tasks], chunksize=1))


def parse_options(text: str) -> ReplayOptions:
    """An option set as ``kvmpfn replay`` takes it: ``"--kernel pfn-io --mmu tdp --bug NAME"``."""
    words = shlex.split(text)
    opts = ReplayOptions()
    bugs: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--kernel-audit":
            opts.kernel_audit = True
            i += 1
            continue
        name, _, value = word.partition("=")
        if not value:
            if i + 1 >= len(words):
                raise ValueError(f"{name} needs a value")
            value = words[i + 1]
            i += 1
        i += 1
        if name == "--kernel" and value in ("page", "pfn", "pfn-io", "notifier"):
            opts.kernel = value
        elif name == "--mmu" and value in ("shadow", "tdp"):
            opts.mmu = value
        elif name == "--bug" and value in BUGS:
            bugs.append(value)
        elif name == "--audit-every" and value.isdigit():
            opts.audit_every = int(value)
        else:
            raise ValueError(f"unsupported option {name} {value}")
    opts.bugs = frozenset(bugs)
    return opts


def first_divergence(a: Run, b: Run) -> dict | None:
    """The first event whose outcome record differs, as ``{"line", "op", "a", "b"}``."""
    for ra, rb in zip(a.records, b.records, strict=False):
        if ra != rb:
            da, db = json.loads(ra), json.loads(rb)
            return {"seq": da["seq"], "line": da["line"], "op": da["op"], "a": da, "b": db}
    if len(a.records) != len(b.records):
        longer = a.records if len(a.records) > len(b.records) else b.records
        extra = json.loads(longer[min(len(a.records), len(b.records))])
        return {"seq": extra["seq"], "line": extra["line"], "op": extra["op"], "a": None, "b": None}
    return None


@dataclass
class MutantResult:
    """A mutant's verdict: killed (findings differ somewhere), blind spot (only outcomes differ), survived."""

    name: str
    citation: str
    verdict: str = "survived"
    killed_by: list[dict] = field(default_factory=list)  # [{"trace", "codes": {code: delta}}]
    changed: list[str] = field(default_factory=list)  # traces whose outcome records changed

    def as_json(self) -> dict:
        return {
            "bug": self.name,
            "citation": self.citation,
            "verdict": self.verdict,
            "killed_by": self.killed_by,
            "outcomes_changed": self.changed,
        }


def finding_delta(base: Run, mut: Run) -> dict[str, int]:
    """Per code, how many more (or fewer) findings the mutant produced; an error counts as code ``error``."""
    delta = {}
    for code in sorted(set(base.by_code) | set(mut.by_code)):
        d = mut.by_code.get(code, 0) - base.by_code.get(code, 0)
        if d:
            delta[code] = d
    if (mut.error is None) != (base.error is None):
        delta["error"] = 1 if mut.error else -1
    return delta


def mutants(paths: Sequence[str], bugs: Sequence[str], base: ReplayOptions, jobs: int) -> list[MutantResult]:
    """Replay every trace unmutated and under each bug; judge each bug."""
    tasks = [(p, base) for p in paths]
    for name in bugs:
        variant = dataclasses.replace(base, bugs=base.bugs | {name})
        tasks.extend((p, variant) for p in paths)
    runs = _run_all(tasks, jobs)
    n = len(paths)
    clean = runs[:n]
    results = []
    for k, name in enumerate(bugs):
        res = MutantResult(name, BUGS[name])
        for i, path in enumerate(paths):
            mut = runs[n * (k + 1) + i]
            delta = finding_delta(clean[i], mut)
            if delta:
                res.killed_by.append({"trace": path, "codes": delta})
            elif mut.records != clean[i].records:
                res.changed.append(path)
        res.verdict = "killed" if res.killed_by else "blind spot" if res.changed else "survived"
        results.append(res)
    return results


def compare(paths: Sequence[str], a: ReplayOptions, b: ReplayOptions, jobs: int) -> list[dict]:
    """Every trace whose outcome records or findings differ between option sets ``a`` and ``b``."""
    runs = _run_all([(p, a) for p in paths] + [(p, b) for p in paths], jobs)
    n = len(paths)
    diffs = []
    for i, path in enumerate(paths):
        ra, rb = runs[i], runs[n + i]
        if ra.records == rb.records and ra.by_code == rb.by_code and ra.error == rb.error:
            continue
        diffs.append(
            {
                "trace": path,
                "first_divergence": first_divergence(ra, rb),
                "findings_a": ra.by_code,
                "findings_b": rb.by_code,
                "error_a": ra.error,
                "error_b": rb.error,
            }
        )
    return diffs
