"""The CI regression gate behind ``kvmpfn audit``: find the traces of a corpus, replay them in parallel
processes, compare each trace's findings with the corpus baseline (docs/trace-format.md, Baselines), split the
corpus into shards, rewrite the baseline.

Corpus. Each directory argument is a corpus root: its traces are the files below it whose names end in
``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` (symlinked directories are not followed), ordered by their paths
relative to the root (POSIX separators, sorted as strings). A file argument is a trace as it is; its corpus
root is the nearest directory holding it that has a ``kvmpfn-baseline.json`` (or is the directory of
``--baseline FILE``), looking upwards no further than a repository root (a directory with ``.git``); failing
that, the file's own directory. The selection is the arguments in order, each directory's traces sorted,
duplicates dropped. A trace's path in reports is the argument joined with its relative path, so relative stays
relative.

Baseline. ``kvmpfn-baseline.json`` in the corpus root, or ``--baseline FILE`` for every root: ``{"version": 1,
"traces": {"rel/path.jsonl": {"code": count}}}``, keyed by the path relative to the corpus root. A trace
without an entry is expected to be clean. A trace passes when its findings by code equal its entry; an input
error makes it an ``error`` whatever it found.

Shards. ``--shard i/n``: the k-th trace of the selection (k from 0) belongs to shard ``(k mod n) + 1``. Every
machine of a CI matrix sees the same selection, so the n shards together cover it exactly once, and each shard
gets an even share (at most one trace more than another).

Jobs. Traces replay in worker processes (``ProcessPoolExecutor``, fork where the platform has it); outcomes
are put back in selection order, so ``--jobs N`` gives the same documents as ``--jobs 1``. ``--fail-fast``
stops at the first failing trace in selection order: later traces are reported as not run (even those a
worker had already finished); traces still running in other workers finish and are discarded.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import PurePath

from kvmpfn import replay as replay_mod
from kvmpfn.errors import InputError
from kvmpfn.replay import ReplayOptions
from kvmpfn.report import ERROR, FAIL, NOT_RUN, PASS, AuditReport, TraceOutcome

BASELINE_NAME = "kvmpfn-baseline.json"
TRACE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")

Baseline = dict[str, dict[str, int]]


class GateError(InputError):
    """A usage error (bad argument, unreadable baseline): exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


@dataclass(frozen=True)
class TraceRef:
    """A trace of the selection: ``path`` as reports show it, ``key`` in ``baseline``, ``root`` its corpus."""

    path: str
    key: str
    root: str
    baseline: str


# -- corpus ------------------------------------------------------------------------------------------------


def find_traces(root: str) -> list[str]:
    """The traces below ``root``: relative POSIX paths, sorted."""

    def fail(err: OSError) -> None:
        raise GateError(f"{err.filename}: {err.strerror}")

    rels = []
    for dirpath, _dirnames, filenames in os.walk(root, onerror=fail):
        for name in filenames:
            if name.endswith(TRACE_SUFFIXES):
                rels.append(PurePath(os.path.relpath(os.path.join(dirpath, name), root)).as_posix())
    return sorted(rels)


def _file_root(path: str, baseline: str | None) -> str:
    """The corpus root of a trace given as a file (see the module docstring), as an absolute path."""
    start = os.path.dirname(os.path.abspath(path))
    override = os.path.dirname(os.path.abspath(baseline)) if baseline else None
    here = start
    while True:
        if here == override or os.path.isfile(os.path.join(here, BASELINE_NAME)):
            return here
        parent = os.path.dirname(here)
        if os.path.exists(os.path.join(here, ".git")) or parent == here:
            return start
        here = parent


def discover(paths: Sequence[str], baseline: str | None = None) -> list[TraceRef]:
    """The selection for the command-line ``paths`` (directories and trace files), in order."""
    refs: list[TraceRef] = []
    seen: set[str] = set()
    owners: dict[tuple[str, str], str] = {}
    for arg in paths:
        if os.path.isdir(arg):
            root = arg
            found = [(os.path.join(arg, *rel.split("/")), rel) for rel in find_traces(arg)]
            default = os.path.join(arg, BASELINE_NAME)
        elif os.path.exists(arg):
            root_abs = _file_root(arg, baseline)
            root = root_abs if os.path.isabs(arg) else os.path.relpath(root_abs)
            found = [(arg, PurePath(os.path.relpath(os.path.abspath(arg), root_abs)).as_posix())]
            default = os.path.join(root, BASELINE_NAME)
        else:
            raise GateError(f"{arg}: no such file or directory")
        for path, key in found:
            ident = os.path.normpath(os.path.abspath(path))
            if ident in seen:
                continue
            seen.add(ident)
            ref = TraceRef(path=path, key=key, root=root, baseline=baseline or default)
            owner = owners.setdefault((os.path.abspath(ref.baseline), key), path)
            if owner != path:
                raise GateError(f'{owner} and {path} have the same baseline entry "{key}" in {ref.baseline}')
            refs.append(ref)
    return refs


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` → ``(2, 4)``; raises ``ValueError`` unless ``1 <= i <= n``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f'"{text}" is not i/n (for example 2/4)')
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f'"{text}": i must be between 1 and n, and n at least 1')
    return index, count


def select_shard(refs: Sequence[TraceRef], index: int, count: int) -> list[TraceRef]:
    """Shard ``index`` of ``count`` (1-based): the k-th trace goes to shard ``(k mod count) + 1``."""
    return [ref for k, ref in enumerate(refs) if k % count == index - 1]


# -- baselines ---------------------------------------------------------------------------------------------


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_baseline(path: str, required: bool = False) -> Baseline:
    """Read a baseline file: trace key → code → count (zero counts dropped). A missing file is an empty
    baseline unless ``required``; anything malformed is a :class:`GateError`."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        if required:
            raise GateError(f"{path}: no such baseline file") from None
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise GateError(f"{path}: cannot read the baseline: {getattr(err, 'strerror', None) or err}") from None
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise GateError(f"{path}: the baseline is not JSON: {err}") from None
    if not isinstance(doc, dict) or set(doc) != {"version", "traces"}:
        raise GateError(f'{path}: a baseline is {{"version": 1, "traces": {{...}}}}')
    if doc["version"] != 1 or isinstance(doc["version"], bool):
        raise GateError(f"{path}: baseline version {json.dumps(doc['version'])} is not 1")
    if not isinstance(doc["traces"], dict):
        raise GateError(f'{path}: "traces" must map trace paths to {{"code": count}}')
    out: Baseline = {}
    for key, entry in doc["traces"].items():
        if not isinstance(entry, dict) or not all(_count(n) for n in entry.values()):
            raise GateError(f'{path}: traces["{key}"] must map finding codes to counts (integers >= 0)')
        out[key] = {code: n for code, n in sorted(entry.items()) if n}
    return out


def baseline_text(entries: Baseline) -> str:
    """The baseline file for ``entries``: traces with findings only, sorted, indented, trailing newline."""
    traces = {key: dict(sorted(entries[key].items())) for key in sorted(entries) if entries[key]}
    return json.dumps({"version": 1, "traces": traces}, indent=2) + "\n"


def write_baseline(path: str, entries: Baseline) -> None:
    """Replace ``path`` atomically with :func:`baseline_text`."""
    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kvmpfn-baseline.", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(baseline_text(entries))
        os.replace(tmp, path)
    except OSError as err:
        raise GateError(f"{path}: cannot write the baseline: {err.strerror}") from None


def load_baselines(refs: Sequence[TraceRef], explicit: bool) -> dict[str, Baseline]:
    """The baseline of every file the selection uses, by path (``explicit``: ``--baseline`` must exist)."""
    return {path: load_baseline(path, explicit) for path in dict.fromkeys(ref.baseline for ref in refs)}


def stale_keys(refs: Sequence[TraceRef], baselines: dict[str, Baseline]) -> list[tuple[str, str]]:
    """(baseline, key) of the entries that name no trace file under any corpus root using that baseline."""
    roots: dict[str, list[str]] = {}
    for ref in refs:
        roots.setdefault(ref.baseline, [])
        if ref.root not in roots[ref.baseline]:
            roots[ref.baseline].append(ref.root)
    return [
        (path, key)
        for path, entries in baselines.items()
        for key in sorted(entries)
        if not any(os.path.isfile(os.path.join(root, *key.split("/"))) for root in roots.get(path, []))
    ]


def update_baselines(refs: Sequence[TraceRef], report: AuditReport, baselines: dict[str, Baseline]) -> list[str]:
    """``--update-baseline``: every trace that replayed without an input error gets its findings as its entry
    (none if clean) and passes; entries of traces not run are kept while their file exists. Writes each
    baseline file and returns their paths."""
    ran: set[tuple[str, str]] = set()
    for ref, outcome in zip(refs, report.outcomes, strict=True):
        if outcome.status in (NOT_RUN, ERROR):
            continue
        entries = baselines[ref.baseline]
        outcome.previous, outcome.expected = outcome.expected, outcome.counts
        outcome.status = PASS
        ran.add((ref.baseline, ref.key))
        if outcome.expected:
            entries[ref.key] = outcome.expected
        else:
            entries.pop(ref.key, None)
    stale = set(stale_keys(refs, baselines)) - ran
    written = []
    for path, entries in baselines.items():
        write_baseline(path, {key: entry for key, entry in entries.items() if (path, key) not in stale})
        written.append(path)
    return written


# -- running -----------------------------------------------------------------------------------------------


def default_jobs() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def replay_one(path: str, options: ReplayOptions) -> tuple[int, list[dict], str | None, float]:
    """Replay one trace (in a worker process): events, findings, input error, seconds."""
    start = time.perf_counter()
    try:
        result = replay_mod.replay_file(path, options)
    except Exception as exc:  # a defect in kvmpfn: one failed trace, not a dead gate
        if os.environ.get("KVMPFN_DEBUG"):
            raise
        return 0, [], f"{path}: internal error: {type(exc).__name__}: {exc}", time.perf_counter() - start
    return result.events, result.findings, result.error, time.perf_counter() - start


def _judge(outcome: TraceOutcome, result: tuple[int, list[dict], str | None, float]) -> None:
    outcome.events, outcome.findings, outcome.error, outcome.seconds = result
    if outcome.error is not None:
        outcome.status = ERROR
    elif outcome.counts != outcome.expected:
        outcome.status = FAIL
    else:
        outcome.status = PASS


def run(
    refs: Sequence[TraceRef],
    expected: Sequence[dict[str, int]],
    options: ReplayOptions,
    *,
    jobs: int = 1,
    stop_on: frozenset[str] = frozenset(),
    on_done: Callable[[str], None] | None = None,
) -> list[TraceOutcome]:
    """Replay ``refs`` and judge each against its ``expected`` counts; outcomes in selection order. After the
    first outcome (in order) whose status is in ``stop_on``, the rest are left ``not run``."""
    outcomes = [TraceOutcome(trace=r.path, key=r.key, expected=dict(e)) for r, e in zip(refs, expected, strict=True)]
    done = on_done or (lambda trace: None)
    workers = min(jobs, len(refs))
    if workers <= 1:
        for ref, outcome in zip(refs, outcomes, strict=True):
            _judge(outcome, replay_one(ref.path, options))
            done(ref.path)
            if outcome.status in stop_on:
                break
        return outcomes

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork") if "fork" in methods else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        pending: dict[Future, int] = {pool.submit(replay_one, r.path, options): k for k, r in enumerate(refs)}
        results: dict[int, tuple] = {}
        next_k = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                k = pending.pop(future)
                try:
                    results[k] = future.result()
                except Exception as exc:  # the worker died (killed, out of memory)
                    results[k] = (0, [], f"{refs[k].path}: internal error: worker failed: {exc!r}", None)
                done(refs[k].path)
            while next_k in results:
                _judge(outcomes[next_k], results.pop(next_k))
                next_k += 1
                if outcomes[next_k - 1].status in stop_on:
                    for future in pending:
                        future.cancel()
                    return outcomes
        return outcomes
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def audit(
    paths: Sequence[str],
    options: ReplayOptions,
    *,
    baseline: str | None = None,
    jobs: int | None = None,
    shard: tuple[int, int] | None = None,
    fail_fast: bool = False,
    update: bool = False,
    progress: Callable[[int], AbstractContextManager[Callable[[str], None]]] | None = None,
    warn: Callable[[str], None] | None = None,
) -> AuditReport:
    """The whole gate: discover, load the baselines, select the shard, run and judge, update the baselines
    if asked. ``progress(n)`` is entered around the run of n traces and yields ``advance(trace)``, called as
    each trace finishes; ``warn`` receives warnings (baseline entries that name no trace)."""
    start = time.perf_counter()
    refs = discover(paths, baseline)
    if not refs:
        raise GateError(f"no traces (*{', *'.join(TRACE_SUFFIXES)}) in {', '.join(paths)}")
    baselines = load_baselines(refs, explicit=baseline is not None and not update)
    if warn is not None:
        for path, key in stale_keys(refs, baselines):
            warn(f'{path}: entry "{key}" names no trace')
    if shard is not None:
        refs = select_shard(refs, *shard)
    expected = [baselines[r.baseline].get(r.key, {}) for r in refs]
    stop_on = frozenset({ERROR} if update else {ERROR, FAIL}) if fail_fast else frozenset()
    with (progress or _no_progress)(len(refs)) as advance:
        outcomes = run(refs, expected, options, jobs=jobs or default_jobs(), stop_on=stop_on, on_done=advance)
    report = AuditReport(outcomes=outcomes, shard=shard)
    if update:
        report.baselines_written = update_baselines(refs, report, baselines)
    report.seconds = time.perf_counter() - start
    return report


@contextmanager
def _no_progress(total: int) -> Iterator[Callable[[str], None]]:
    yield lambda trace: None


def exit_status(report: AuditReport, single_trace: bool) -> int:
    """0 pass; 1 a failing trace (or an input error in a corpus); 2 the input error of a single trace FILE."""
    statuses = {o.status for o in report.outcomes}
    if ERROR in statuses:
        return 2 if single_trace else 1
    return 1 if FAIL in statuses else 0
