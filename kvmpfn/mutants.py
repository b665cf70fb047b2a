"""``kvmpfn mutants`` (would this corpus catch the bugs KVM really had?) and ``kvmpfn compare`` (does a change
of kernel, MMU or bug switch alter what the MMU does?). Both replay every trace under two or more option sets
and diff outcome records and findings. Tasks run through :mod:`kvmpfn.runner` (local processes or dask),
results in corpus order. A run keeps a digest of its outcome records, not the records: memory does not grow
with trace length.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvmpfn import runner
from kvmpfn.kvm.bugs import BUGS
from kvmpfn.replay import ReplayOptions, replay_file
from kvmpfn.runner import Failure, RunnerConfig, Task

#: outcome records per digest: a run keeps 16 bytes per CHUNK records, and a difference is looked for again
#: in the first chunk that differs
CHUNK = 1024


class RecordDigest:
    """The ``emit`` stream of a replay that keeps, instead of the records, a digest of every CHUNK records
    (and the records numbered ``window[0]`` to ``window[1] - 1``, if asked)."""

    def __init__(self, window: tuple[int, int] | None = None) -> None:
        self.count = 0
        self.chunks: list[bytes] = []
        self.window = window
        self.kept: list[str] = []
        self._hash = hashlib.blake2b(digest_size=16)

    def write(self, line: str) -> int:  # replay_file writes one record per call
        if self.window is not None and self.window[0] <= self.count < self.window[1]:
            self.kept.append(line.rstrip("\n"))
        self._hash.update(line.encode("utf-8", "surrogatepass"))
        self.count += 1
        if self.count % CHUNK == 0:
            self.chunks.append(self._hash.digest())
            self._hash = hashlib.blake2b(digest_size=16)
        return len(line)

    def finish(self) -> list[bytes]:
        if self.count % CHUNK:
            self.chunks.append(self._hash.digest())
        return self.chunks


@dataclass
class Run:
    """One replay of one trace: digests of its outcome records, how many, findings by code, error; ``window``:
    the records that a window run kept."""

    chunks: list[bytes]
    records: int
    by_code: dict[str, int]
    error: str | None
    window: list[str] = field(default_factory=list)

    def same_records(self, other: Run) -> bool:
        return self.records == other.records and self.chunks == other.chunks

    def first_chunk_differing(self, other: Run) -> int:
        for c, (a, b) in enumerate(zip(self.chunks, other.chunks, strict=False)):
            if a != b:
                return c
        return min(len(self.chunks), len(other.chunks))


def run_trace(path: str, shown: str, options: ReplayOptions, window: tuple[int, int] | None = None) -> Run:
    """Replay ``path`` under ``options`` (a :mod:`kvmpfn.runner` task) and keep what the comparisons need."""
    emit = RecordDigest(window)
    result = replay_file(path, options, emit)  # type: ignore[arg-type]
    if result.interrupted:
        raise KeyboardInterrupt
    error = result.error.replace(path, shown, 1) if result.error and path != shown else result.error
    by_code = dict(sorted(Counter(f["code"] for f in result.findings).items()))
    return Run(emit.finish(), emit.count, by_code, error, emit.kept)


def _run_all(
    tasks: list[Task],
    config: RunnerConfig,
    warn: Callable[[str], None] | None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Run]:
    """Run ``tasks``; ``progress(done, total)`` as each finishes."""
    runs = []
    done = [0]

    def on_done(k: int) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(tasks))

    for _k, result in runner.run(tasks, config, on_done=on_done, warn=warn):
        runs.append(Run([], 0, {}, result.message) if isinstance(result, Failure) else result)
    return runs


def first_divergence(a: list[str], b: list[str]) -> dict | None:
    """The first event whose outcome record differs between two runs' records (the same window of each), as
    ``{"seq", "line", "op", "a", "b"}`` (``a`` and ``b`` None where one run has no record there)."""
    for ra, rb in zip(a, b, strict=False):
        if ra != rb:
            da, db = json.loads(ra), json.loads(rb)
            return {"seq": da["seq"], "line": da["line"], "op": da["op"], "a": da, "b": db}
    if len(a) != len(b):
        extra = json.loads((a if len(a) > len(b) else b)[min(len(a), len(b))])
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


def mutants(
    paths: Sequence[str],
    bugs: Sequence[str],
    base: ReplayOptions,
    config: RunnerConfig,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[MutantResult]:
    """Replay every trace unmutated and under each bug; judge each bug."""
    variants = [base] + [dataclasses.replace(base, bugs=base.bugs | {name}) for name in bugs]
    runs = _run_all([Task(run_trace, p, opts) for opts in variants for p in paths], config, warn, progress)
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
            elif not mut.same_records(clean[i]):
                res.changed.append(path)
        res.verdict = "killed" if res.killed_by else "blind spot" if res.changed else "survived"
        results.append(res)
    return results


def compare(
    paths: Sequence[str],
    a: ReplayOptions,
    b: ReplayOptions,
    config: RunnerConfig,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Every trace whose outcome records or findings differ between option sets ``a`` and ``b``. Runs keep
    digests, not records: a trace whose records differ is replayed again under both, keeping the first chunk
    of records that differs, to name the first diverging event."""
    tasks = [Task(run_trace, p, a) for p in paths] + [Task(run_trace, p, b) for p in paths]
    runs = _run_all(tasks, config, warn, progress)
    n = len(paths)
    differ = [i for i in range(n) if not runs[i].same_records(runs[n + i])]
    windows = {}
    for i in differ:
        c = runs[i].first_chunk_differing(runs[n + i])
        windows[i] = (c * CHUNK, (c + 1) * CHUNK)
    again = [Task(functools.partial(run_trace, window=windows[i]), paths[i], opts) for opts in (a, b) for i in differ]
    rerun = _run_all(again, config, warn)
    divergence = {i: first_divergence(rerun[j].window, rerun[len(differ) + j].window) for j, i in enumerate(differ)}
    diffs = []
    for i, path in enumerate(paths):
        ra, rb = runs[i], runs[n + i]
        if i not in divergence and ra.by_code == rb.by_code and ra.error == rb.error:
            continue
        diffs.append(
            {
                "trace": path,
                "first_divergence": divergence.get(i),
                "findings_a": ra.by_code,
                "findings_b": rb.by_code,
                "error_a": ra.error,
                "error_b": rb.error,
            }
        )
    return diffs
