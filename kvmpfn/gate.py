"""The CI regression gate behind ``kvmpfn audit``: find the traces of a corpus, replay them in parallel
processes, compare each trace's findings with the corpus baseline (docs/trace-format.md, Baselines), split the
corpus into shards, rewrite the baseline.

Corpus. A directory argument's traces are the files below it whose names end in ``.jsonl``, ``.jsonl.gz`` or
``.jsonl.zst`` (symlinked directories are not followed), ordered by their paths relative to it (POSIX
separators, sorted as strings). A file argument is a trace as it is. The corpus root of a directory, or of a
file's directory, is the nearest directory at or above it that has a ``kvmpfn-baseline.json`` (or is the
directory of ``--baseline FILE``), looking upwards no further than a repository root (a directory with
``.git``); failing that, the directory itself. So ``audit traces/findings`` checks those traces against
``traces/kvmpfn-baseline.json``, as ``audit traces`` does. The selection is the arguments in order, each
directory's traces sorted, duplicates dropped. A trace's path in reports is the argument joined with its
relative path, so relative stays relative.

Baseline. ``kvmpfn-baseline.json`` in the corpus root, or ``--baseline FILE`` for every root: ``{"version": 1,
"traces": {"rel/path.jsonl": {"code": count}}}``, keyed by the path relative to the corpus root. A trace
without an entry is expected to be clean. A trace passes when its findings by code equal its entry; an input
error makes it an ``error`` whatever it found.

Shards. ``--shard i/n``: the selection is split by trace size, deterministically: traces are taken largest
first (ties by path) and each goes to the shard with the fewest bytes so far (ties: the lower shard); a shard
then runs its traces in selection order. Every machine of a CI matrix sees the same selection and the same
sizes, so the n shards together cover it exactly once. A shard's JSON report records the whole selection, so
``kvmpfn merge`` can join the shards into the report of the unsharded run.

Jobs. Traces replay through :mod:`kvmpfn.runner` (local worker processes or a dask cluster); outcomes are
put back in selection order, so any ``--jobs`` or executor gives the same documents as ``--jobs 1``.
``--fail-fast`` stops at the first failing trace in selection order: later traces are reported as not run
(even those a worker had already finished); traces still running are cancelled. Ctrl-C stops the run:
:class:`Interrupted` carries the report of the traces that finished.

Concurrent updates. ``--update-baseline`` (and ``kvmpfn merge --update-baseline``) takes an exclusive lock
(``flock``) on ``.NAME.lock`` beside the baseline, re-reads the baseline under the lock, applies this run's
entries and replaces the file atomically, so shards updating one baseline at once lose nothing.
"""

from __future__ import annotations

import difflib
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import PurePath

from kvmpfn import replay as replay_mod
from kvmpfn import runner, vocab
from kvmpfn.errors import InputError
from kvmpfn.kvm.bugs import BUGS
from kvmpfn.outputs import AtomicFile
from kvmpfn.replay import ReplayOptions
from kvmpfn.report import ERROR, FAIL, NOT_RUN, PASS, AuditReport, TraceOutcome
from kvmpfn.runner import Failure, RunnerConfig, Task, default_jobs

BASELINE_NAME = "kvmpfn-baseline.json"
TRACE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")

Baseline = dict[str, dict[str, int]]
#: the largest baseline file read (a baseline holds counts per trace: megabytes are already absurd)
MAX_BASELINE = 64 << 20


class GateError(InputError):
    """A usage error (bad argument, unreadable baseline): exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``report`` holds the traces that finished (the others are not run)."""

    def __init__(self, report: AuditReport) -> None:
        super().__init__()
        self.report = report


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


def _corpus_root(start: str, baseline: str | None) -> str:
    """The corpus root of a directory argument, or of a trace file's directory, ``start`` (absolute): see the
    module docstring."""
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
            root_abs = _corpus_root(os.path.abspath(arg), baseline)
            prefix = PurePath(os.path.relpath(os.path.abspath(arg), root_abs)).as_posix()
            prefix = "" if prefix == "." else prefix + "/"
            found = [(os.path.join(arg, *rel.split("/")), prefix + rel) for rel in find_traces(arg)]
        elif os.path.exists(arg):
            root_abs = _corpus_root(os.path.dirname(os.path.abspath(arg)), baseline)
            found = [(arg, PurePath(os.path.relpath(os.path.abspath(arg), root_abs)).as_posix())]
        else:
            raise GateError(f"{arg}: no such file or directory")
        root = root_abs if os.path.isabs(arg) else os.path.relpath(root_abs)
        default = os.path.join(root, BASELINE_NAME)
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


def shard_of(sizes: Sequence[tuple[str, int]], count: int) -> list[int]:
    """The shard (1-based) of each ``(path, bytes)``: largest first, ties by path, each into the shard with the
    fewest bytes so far (ties: the lower shard)."""
    loads = [0] * count
    shards = [0] * len(sizes)
    for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k][1], sizes[k][0])):
        lightest = min(range(count), key=lambda s: (loads[s], s))
        loads[lightest] += sizes[k][1]
        shards[k] = lightest + 1
    return shards


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def select_shard(refs: Sequence[TraceRef], index: int, count: int) -> list[TraceRef]:
    """Shard ``index`` of ``count`` (1-based), balanced by file size (:func:`shard_of`), in selection order."""
    shards = shard_of([(ref.path, _size(ref.path)) for ref in refs], count)
    return [ref for ref, shard in zip(refs, shards, strict=True) if shard == index]


# -- baselines ---------------------------------------------------------------------------------------------


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_baseline(path: str) -> bytes | None:
    """The baseline's bytes, or None if there is no file; refuses a non-regular file before reading it (a FIFO
    would block, ``/dev/zero`` never ends) and a file above MAX_BASELINE."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise GateError(f"{path}: cannot read the baseline: {err.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GateError(f"{path}: the baseline is not a regular file")
        if st.st_size > MAX_BASELINE:
            raise GateError(f"{path}: the baseline is {st.st_size:,} bytes, more than {MAX_BASELINE >> 20} MiB")
        try:
            return fh.read()
        except OSError as err:
            raise GateError(f"{path}: cannot read the baseline: {err.strerror}") from None


def _utf8(path: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        raise GateError(f"{path}: the baseline holds a lone surrogate \\u{code:04x} in {text!a}") from None
    return text


def load_baseline(path: str, required: bool = False) -> Baseline:
    """Read a baseline file: trace key → code → count (zero counts dropped). A missing file is an empty
    baseline unless ``required``; anything malformed is a :class:`GateError`."""
    return _parse_baseline(path, required)[0]


def load_baseline_model(path: str) -> dict:
    """The options a baseline was recorded under (``ReplayOptions.model()``; ``{}``: none)."""
    return _parse_baseline(path, False)[1]


def model_text(model: dict) -> str:
    """``{"kernel": "pfn-io", "bugs": ["x"]}`` → ``--kernel pfn-io --bug x``; ``{}`` → ``no MMU options``."""
    words = [f"--{k} {v}" for k, v in model.items() if k != "bugs"] + [f"--bug {b}" for b in model.get("bugs", [])]
    return " ".join(words) or "no MMU options"


def _parse_baseline(path: str, required: bool) -> tuple[Baseline, dict]:
    data = _read_baseline(path)
    if data is None:
        if required:
            raise GateError(f"{path}: no such baseline file")
        return {}, {}
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise GateError(f"{path}: the baseline is not UTF-8: {err}") from None
    except RecursionError:
        raise GateError(f"{path}: the baseline is not a baseline: JSON nested too deeply") from None
    except ValueError as err:
        raise GateError(f"{path}: the baseline is not JSON: {err}") from None
    if not isinstance(doc, dict) or set(doc) - {"options"} != {"version", "traces"}:
        raise GateError(f'{path}: a baseline is {{"version": 1, "traces": {{...}}}} (and "options" if recorded)')
    model = doc.get("options", {})
    _check_model(path, model)
    if doc["version"] != 1 or isinstance(doc["version"], bool):
        raise GateError(f"{path}: baseline version {json.dumps(doc['version'])} is not 1")
    if not isinstance(doc["traces"], dict):
        raise GateError(f'{path}: "traces" must map trace paths to {{"code": count}}')
    out: Baseline = {}
    for key, entry in doc["traces"].items():
        if not isinstance(entry, dict) or not all(_count(n) for n in entry.values()):
            raise GateError(f"{path}: traces[{json.dumps(key)}] must map finding codes to counts (integers >= 0)")
        for code in entry:
            _utf8(path, code)
            if code not in vocab.CODES:
                hint = _close(code, vocab.CODES)
                raise GateError(f"{path}: traces[{json.dumps(key)}]: unknown finding code {json.dumps(code)}{hint}")
        out[_utf8(path, key)] = {_utf8(path, code): n for code, n in sorted(entry.items()) if n}
    return out, model


def _close(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {json.dumps(close[0])}?)" if close else ""


def _check_model(path: str, model: object) -> None:
    """A baseline's ``options``: ``{"mmu", "kernel", "tdp", "bugs"}``, each a known value."""
    known = {"mmu": vocab.MMUS, "kernel": vocab.KERNELS, "tdp": vocab.TDPS}
    if not isinstance(model, dict):
        raise GateError(f'{path}: "options" must be an object: {{"mmu", "kernel", "tdp", "bugs"}}')
    for name, value in model.items():
        if name == "bugs" and isinstance(value, list) and all(isinstance(b, str) for b in value):
            for bug in value:
                if bug not in BUGS:
                    raise GateError(f"{path}: options.bugs: unknown bug {json.dumps(bug)}{_close(bug, BUGS)}")
        elif name not in known and name != "bugs":
            hint = _close(name, [*known, "bugs"])
            raise GateError(f"{path}: options: unknown option {json.dumps(name)}{hint} (known: mmu, kernel, tdp, bugs)")
        elif name == "bugs":
            raise GateError(f"{path}: options.bugs: {json.dumps(value)} is not a list of bug names")
        elif value not in known[name]:
            expected = ", ".join(json.dumps(v) for v in known[name])
            raise GateError(f"{path}: options.{name}: {json.dumps(value)} is not one of {expected}")


def baseline_text(entries: Baseline, model: dict | None = None) -> str:
    """The baseline file for ``entries``: traces with findings only, sorted, indented, trailing newline; the
    options it was recorded under (``model``) when there are any."""
    traces = {key: dict(sorted(entries[key].items())) for key in sorted(entries) if entries[key]}
    doc: dict = {"version": 1, "options": model} if model else {"version": 1}
    doc["traces"] = traces
    return json.dumps(doc, indent=2) + "\n"


def write_baseline(path: str, entries: Baseline, model: dict | None = None) -> None:
    """Replace ``path`` atomically with :func:`baseline_text`."""
    with AtomicFile(path) as fh:
        fh.write(baseline_text(entries, model).encode("utf-8"))


@contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``.NAME.lock`` beside the baseline ``path`` (its target, if a symlink)."""
    target = os.path.realpath(path)
    lock = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise GateError(f"{lock}: cannot lock the baseline: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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


def update_baselines(
    refs: Sequence[TraceRef], report: AuditReport, baselines: dict[str, Baseline], model: dict | None = None
) -> list[str]:
    """``--update-baseline``: every trace that replayed without an input error gets its findings as its entry
    (none if clean) and passes; entries of traces not run are kept while their file exists. Each baseline file
    is re-read and rewritten under its lock (:func:`locked`), so concurrent updates of other traces are kept.
    Returns the paths written."""
    ran: dict[str, dict[str, dict[str, int]]] = {}
    for ref, outcome in zip(refs, report.outcomes, strict=True):
        if outcome.status in (NOT_RUN, ERROR):
            continue
        outcome.previous, outcome.expected = outcome.expected, outcome.counts
        outcome.status = PASS
        ran.setdefault(ref.baseline, {})[ref.key] = outcome.expected
    written = []
    for path in baselines:
        with locked(path):
            entries = load_baseline(path)
            for key, entry in ran.get(path, {}).items():
                entries[key] = entry
            stale = {key for _p, key in stale_keys(refs, {path: entries})} - set(ran.get(path, {}))
            kept = {key: entry for key, entry in entries.items() if entry and key not in stale}
            write_baseline(path, kept, model)
            baselines[path] = entries
        written.append(path)
    return written


def update_from_merge(report: AuditReport, selection: dict) -> None:
    """``kvmpfn merge --update-baseline``: the baselines of the merged run's selection, rediscovered here."""
    refs = discover(selection["paths"], selection["baseline"])
    if [ref.path for ref in refs] != [o.trace for o in report.outcomes]:
        raise GateError("the corpus here is not the one the shards replayed (run merge where audit ran)")
    for ref, outcome in zip(refs, report.outcomes, strict=True):
        outcome.key = ref.key
    report.baselines_written = update_baselines(refs, report, load_baselines(refs, explicit=False))


# -- running -----------------------------------------------------------------------------------------------


def replay_one(path: str, shown: str, options: ReplayOptions) -> tuple[int, list[dict], str | None, float]:
    """Replay one trace (a :mod:`kvmpfn.runner` task): events, findings, input error, seconds."""
    start = time.perf_counter()
    result = replay_mod.replay_file(path, options)
    if result.interrupted:
        raise KeyboardInterrupt
    error = result.error.replace(path, shown, 1) if result.error and path != shown else result.error
    return result.events, result.findings, error, time.perf_counter() - start


def _judge(outcome: TraceOutcome, result: tuple[int, list[dict], str | None, float | None] | Failure) -> None:
    if isinstance(result, Failure):
        result = (0, [], result.message, None)
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
    config: RunnerConfig,
    *,
    stop_on: frozenset[str] = frozenset(),
    on_done: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[TraceOutcome]:
    """Replay ``refs`` and judge each against its ``expected`` counts; outcomes in selection order. After the
    first outcome (in order) whose status is in ``stop_on``, the rest are left ``not run``. Ctrl-C raises
    :class:`Interrupted` with the outcomes so far."""
    outcomes = [TraceOutcome(trace=r.path, key=r.key, expected=dict(e)) for r, e in zip(refs, expected, strict=True)]
    done = on_done or (lambda trace: None)
    tasks = [Task(replay_one, ref.path, options) for ref in refs]
    results = runner.run(tasks, config, on_done=lambda k: done(refs[k].path), warn=warn)
    try:
        for k, result in results:
            _judge(outcomes[k], result)
            if outcomes[k].status in stop_on:
                break
    except KeyboardInterrupt:
        raise Interrupted(AuditReport(outcomes=outcomes)) from None
    finally:
        results.close()
    return outcomes


def audit(
    paths: Sequence[str],
    options: ReplayOptions,
    *,
    baseline: str | None = None,
    config: RunnerConfig | None = None,
    shard: tuple[int, int] | None = None,
    fail_fast: bool = False,
    update: bool = False,
    progress: Callable[[int], AbstractContextManager[Callable[[str], None]]] | None = None,
    warn: Callable[[str], None] | None = None,
) -> AuditReport:
    """The whole gate: discover, load the baselines, select the shard, run and judge, update the baselines
    if asked. ``progress(n)`` is entered around the run of n traces and yields ``advance(trace)``, called as
    each trace finishes; ``warn`` receives warnings (baseline entries that name no trace, jobs clamped).
    Ctrl-C raises :class:`Interrupted` with the report of what finished."""
    start = time.perf_counter()
    config = config or RunnerConfig(jobs=default_jobs())
    refs = discover(paths, baseline)
    if not refs:
        raise GateError(f"no traces (*{', *'.join(TRACE_SUFFIXES)}) in {', '.join(paths)}")
    baselines = load_baselines(refs, explicit=baseline is not None and not update)
    models = {path: load_baseline_model(path) for path in baselines}
    options = _recorded_options(options, models, baselines, update)
    if warn is not None and not update:
        for path, model in models.items():
            if model != options.model():
                warn(
                    f"{path} was recorded with {model_text(model)}, this run uses {model_text(options.model())}: "
                    "findings may differ for that reason alone"
                )
    if warn is not None:
        for path, key in stale_keys(refs, baselines):
            warn(f'{path}: entry "{key}" names no trace')
    selection = None
    if shard is not None:
        selection = {"paths": list(paths), "baseline": baseline, "traces": [r.path for r in refs]}
        refs = select_shard(refs, *shard)
    expected = [baselines[r.baseline].get(r.key, {}) for r in refs]
    stop_on = frozenset({ERROR} if update else {ERROR, FAIL}) if fail_fast else frozenset()
    meta = {"options": options.document(), "shard": shard, "selection": selection}
    try:
        with (progress or _no_progress)(len(refs)) as advance:
            outcomes = run(refs, expected, options, config, stop_on=stop_on, on_done=advance, warn=warn)
    except Interrupted as stop:
        stop.report.options, stop.report.shard, stop.report.selection = meta["options"], shard, selection
        stop.report.interrupted = True
        raise
    report = AuditReport(outcomes=outcomes, **meta)
    if update:
        report.baselines_written = update_baselines(refs, report, baselines, options.model())
    report.seconds = time.perf_counter() - start
    return report


def _recorded_options(
    options: ReplayOptions, models: dict[str, dict], baselines: dict[str, Baseline], update: bool
) -> ReplayOptions:
    """A baseline holds the findings of one modelled MMU: the options it records (``mmu``, ``kernel``, ``tdp``,
    ``--bug``). A run given none of these options replays under the ones its baselines record;
    ``--update-baseline`` refuses to write findings of other options into a baseline that has entries."""
    run = options.model()
    recorded = {json.dumps(m, sort_keys=True) for m in models.values()}
    if not run and len(recorded) > 1:
        raise GateError("the baselines of these corpora record different options: audit them one at a time")
    if not run and recorded:
        run = next(iter(models.values()))
        options = options.with_model(run)
    for path, model in models.items():
        if update and model != run and (baselines[path] or model):
            raise GateError(
                f"{path} holds findings recorded with {model_text(model)}; --update-baseline with {model_text(run)} "
                "would mix two MMUs' findings: give this run a baseline of its own (--baseline FILE)"
            )
    return options


@contextmanager
def _no_progress(total: int) -> Iterator[Callable[[str], None]]:
    yield lambda trace: None


def exit_status(report: AuditReport, single_trace: bool) -> int:
    """0 pass; 1 a failing trace (or an input error in a corpus); 2 the input error of a single trace FILE."""
    statuses = {o.status for o in report.outcomes}
    if ERROR in statuses:
        return 2 if single_trace else 1
    return 1 if FAIL in statuses else 0
