"""``kvmpfn reduce``: the smallest trace that still shows a finding (or a divergence between two option sets).

The trace is held in memory and replayed through :class:`~kvmpfn.replay.Replayer` once per candidate. The
search uses what a replay knows before falling back to delta debugging:

1. cut every event after the one where the finding was detected (an ``audit`` event is appended when the
   finding came from an audit point that the cut removed);
2. try the events the finding's provenance names (the ledger's ``seq`` of every reference behind it), with
   the events that touched the same guest frames;
3. ddmin (Zeller and Hildebrandt, "Simplifying and isolating failure-inducing input", 2002) over the events,
   then over the header's memslots;
4. simplify values while the finding stays: memslots halved, vcpus renumbered to 0, access flags cleared,
   guest flags back to their defaults; then ddmin once more.

"Still shows the finding" means: a finding of the same code on the same kind of subject (the fields among
pfn, gfn, addr, level, slot that it names). Every step is deterministic, so the same input gives the same
output bytes.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import msgspec
from msgspec.structs import replace as evolve

from kvmpfn.errors import InputError, InternalError, KernelBug
from kvmpfn.host import HostError
from kvmpfn.outputs import refuse_inputs
from kvmpfn.replay import Replayer, ReplayOptions, kernel_bug_finding
from kvmpfn.trace import events as ev
from kvmpfn.trace.reader import open_trace
from kvmpfn.trace.writer import TraceWriter
from kvmpfn.x86 import PAGE_SHIFT

SUBJECT_FIELDS = ("pfn", "gfn", "addr", "level", "slot")


class ReduceError(InputError):
    """The trace cannot be reduced: it does not show what should be kept, or it cannot be read."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


@dataclass
class Run:
    """One in-memory replay: findings, outcome records (when asked for) and the input error that stopped it."""

    findings: list[dict]
    records: list[dict] | None
    error: str | None
    at: int = -1  # the event the input error stopped at (-1: the header or the end)

    def by_code(self) -> dict[str, int]:
        return dict(sorted(Counter(f["code"] for f in self.findings).items()))


def replay_events(header: ev.Header, events: Sequence, options: ReplayOptions, records: bool = False) -> Run:
    """Replay ``events`` after ``header`` in memory as ``replay_file`` replays a file: a simulated kernel BUG
    is a ``kernel-bug`` finding that stops the replay, the header's ``teardown`` runs at the end. An input
    error (a candidate that is no longer a valid trace) is returned in ``error``."""
    out: list[dict] | None = [] if records else None
    rp = None
    seq = -1
    try:
        rp = Replayer(header, options, records=records)
        for seq, e in enumerate(events):
            try:
                rec = rp.apply(seq, seq + 2, e)
            except KernelBug as bug:
                kernel_bug_finding(rp.findings, bug)
                return Run(rp.findings.items, out, None)
            if out is not None:
                out.append(rec)
        rp.recorded.finish()
        if header.teardown and not rp.torn_down:
            rp.findings.seq, rp.findings.point = seq + 1, "teardown"
            try:
                rp.do_teardown()
            except KernelBug as bug:
                kernel_bug_finding(rp.findings, bug)
    except (InputError, HostError, InternalError) as err:
        at = seq if rp is not None and seq < len(events) else -1
        return Run(rp.findings.items if rp else [], out, str(err) or type(err).__name__, at)
    return Run(rp.findings.items, out, None)


def subject_kind(finding: dict) -> tuple[str, ...]:
    """The kind of subject a finding names: its code and which of :data:`SUBJECT_FIELDS` it carries."""
    return (finding["code"], *(name for name in SUBJECT_FIELDS if name in finding))


def load_trace(path: str) -> tuple[ev.Header, list]:
    """The header and every event of the trace at ``path`` (raises the reader's one-line ``TraceError``)."""
    with open_trace(path) as reader:
        header = reader.header
        events = [e for _, e in reader]
    if header.memory is not None:
        raise ReduceError(f"{path}: a trace with a guest-memory image (header memory) cannot be reduced")
    return header, events


Test = Callable[[ev.Header, Sequence], bool]


def keep_finding(options: ReplayOptions, kind: tuple[str, ...]) -> Test:
    """The candidate replays without input error and shows a finding of ``kind`` (see :func:`subject_kind`)."""

    def test(header: ev.Header, events: Sequence) -> bool:
        run = replay_events(header, events, options)
        return run.error is None and any(subject_kind(f) == kind for f in run.findings)

    return test


def keep_divergence(a: ReplayOptions, b: ReplayOptions) -> Test:
    """The candidate's outcome records or findings differ between option sets ``a`` and ``b`` (neither run
    stopped by an input error)."""

    def test(header: ev.Header, events: Sequence) -> bool:
        ra, rb = replay_events(header, events, a, records=True), replay_events(header, events, b, records=True)
        if ra.error or rb.error:
            return False
        return ra.records != rb.records or ra.by_code() != rb.by_code()

    return test


def keep_kill(options: ReplayOptions, bug: str, kind: tuple[str, ...]) -> Test:
    """The candidate replays clean under ``options`` and shows a finding of ``kind`` under ``--bug bug``: a
    trace that kills the mutant and needs no baseline entry."""
    mutant = replace(options, bugs=options.bugs | {bug})

    def test(header: ev.Header, events: Sequence) -> bool:
        run = replay_events(header, events, mutant)
        if run.error or not any(subject_kind(f) == kind for f in run.findings):
            return False
        clean = replay_events(header, events, options)
        return clean.error is None and not clean.findings

    return test


@dataclass
class Reduction:
    """What :func:`reduce_trace` found: the header and events of the smallest trace, and how it got there."""

    header: ev.Header
    events: list
    original: int
    replays: int = 0
    steps: list[str] = field(default_factory=list)


class _Search:
    """The candidate test with a cache (keyed by event identities and the header) and a replay counter."""

    def __init__(self, test: Test, progress: Callable[[int, str], None]) -> None:
        self.test = test
        self.progress = progress
        self.replays = 0
        self.cache: dict[tuple, tuple[bool, Sequence]] = {}
        self.stage = ""

    def __call__(self, header: ev.Header, events: Sequence) -> bool:
        key = (msgspec.json.encode(header), array("q", map(id, events)).tobytes())
        hit = self.cache.get(key)
        if hit is not None:
            return hit[0]
        self.replays += 1
        self.progress(self.replays, f"{self.stage}: {len(events)} events")
        ok = self.test(header, events)
        self.cache[key] = (ok, events)  # keeps the events alive: their ids stay theirs
        return ok


def ddmin(items: list, test: Callable[[list], bool]) -> list:
    """Zeller's ddmin, complement-first: a 1-minimal sublist of ``items`` (which must pass ``test``) that
    passes ``test``; order is kept."""
    n = 2
    while len(items) >= 2:
        chunk = -(-len(items) // n)
        parts = [items[i : i + chunk] for i in range(0, len(items), chunk)]
        for i in range(len(parts)):
            rest = [x for j, p in enumerate(parts) if j != i for x in p]
            if test(rest):
                items, n = rest, max(n - 1, 2)
                break
        else:
            if n >= len(items):
                break
            n = min(2 * n, len(items))
    return items


def _touched_gfns(e) -> set[int]:
    gfns = set()
    for name in ("gpa", "addr"):
        value = getattr(e, name, None)
        if value is not None:
            gfns.add(value >> PAGE_SHIFT)
    if isinstance(e, ev.Write | ev.PteWrite):
        gfns.add((e.val & 0x000F_FFFF_FFFF_F000) >> PAGE_SHIFT)
    return gfns


def _related(events: list, finding: dict) -> list[int]:
    """Indices of the events behind ``finding``: its provenance, the event that detected it, and every
    event that touched a guest frame one of those touched."""
    seqs = {p["seq"] for p in finding.get("provenance", ()) if isinstance(p, dict) and "seq" in p}
    seqs.add(finding["seq"])
    seqs = {s for s in seqs if 0 <= s < len(events)}
    gfns: set[int] = set()
    for s in seqs:
        gfns |= _touched_gfns(events[s])
    if "gfn" in finding:
        gfns.add(int(finding["gfn"], 16))
    return [i for i, e in enumerate(events) if i in seqs or _touched_gfns(e) & gfns]


def _simpler_values(header: ev.Header, events: list):
    """Candidate simplifications, one change each: (what, header, events)."""
    if header.x is not None:
        yield "header x dropped", evolve(header, x=None), events
    memslots = header.memslots
    for i, ms in enumerate(memslots):
        npages = ms.npages // 2
        while npages >= 1:
            slots = [*memslots[:i], evolve(ms, npages=npages), *memslots[i + 1 :]]
            yield f"memslot {ms.slot} npages {npages:#x}", evolve(header, memslots=slots), events
            npages //= 2
    defaults = ev.Guest()
    for name in ("cr4_smep", "cr4_smap", "gbpages", "maxphyaddr", "cr4_pse", "efer_nx", "cr0_wp"):
        if getattr(header.guest, name) != getattr(defaults, name):
            guest = evolve(header.guest, **{name: getattr(defaults, name)})
            yield f"guest {name} default", evolve(header, guest=guest), events
    if any(getattr(e, "vcpu", 0) for e in events):
        yield "vcpu 0", header, [evolve(e, vcpu=0) if e.vcpu else e for e in events]
    for i, e in enumerate(events):
        if isinstance(e, ev.Access):
            for flag in ("fetch", "user", "write", "ac"):
                if getattr(e, flag):
                    yield f"event {i} {flag} 0", header, [*events[:i], evolve(e, **{flag: False}), *events[i + 1 :]]


def reduce_trace(
    header: ev.Header, events: list, test: Test, finding: dict | None, progress=lambda done, what: None
) -> Reduction:
    """Shrink ``events`` (and ``header``) while ``test`` holds; ``finding`` (the one to keep, from a replay of
    the whole trace) gives the cut point and the provenance to start from."""
    search = _Search(test, progress)
    red = Reduction(header, list(events), len(events))
    if not search(header, red.events):
        raise ReduceError("the trace does not show what should be kept")

    def attempt(what: str, h: ev.Header, evs: list) -> bool:
        if len(evs) <= len(red.events) and search(h, evs):
            red.header, red.events = h, evs
            red.steps.append(what)
            return True
        return False

    search.stage = "cut"
    if finding is not None and finding["seq"] + 1 < len(red.events):
        cut = red.events[: finding["seq"] + 1]
        attempt(f"cut after seq {finding['seq']}", header, cut) or attempt(
            f"cut after seq {finding['seq']} + audit", header, [*cut, ev.Audit()]
        )
    search.stage = "provenance"
    if finding is not None:
        related = [red.events[i] for i in _related(red.events, finding) if i < len(red.events)]
        tail = [] if isinstance(red.events[-1], ev.Audit) and red.events[-1] in related else [ev.Audit()]
        if related and len(related) < len(red.events):
            attempt(f"provenance {len(related)} events", red.header, related) or attempt(
                f"provenance {len(related)} events + audit", red.header, [*related, *tail]
            )
    for _round in range(2):
        before = (len(red.events), len(red.header.memslots))
        search.stage = "ddmin events"
        kept = ddmin(red.events, lambda evs: search(red.header, evs))
        if len(kept) < len(red.events):
            red.steps.append(f"ddmin {len(red.events)} -> {len(kept)} events")
            red.events = kept
        search.stage = "ddmin memslots"
        if len(red.header.memslots) > 1:
            slots = ddmin(list(red.header.memslots), lambda s: search(evolve(red.header, memslots=s), red.events))
            if len(slots) < len(red.header.memslots):
                red.steps.append(f"memslots {len(red.header.memslots)} -> {len(slots)}")
                red.header = evolve(red.header, memslots=slots)
        search.stage = "simplify"
        steps, changed = len(red.steps), True
        while changed:
            changed = False
            for what, h, evs in _simpler_values(red.header, red.events):
                if attempt(what, h, evs):
                    changed = True
                    break
        if len(red.steps) > steps:
            n = len(red.steps) - steps
            red.steps[steps:] = [f"{n} value{'s' * (n != 1)} simplified"]
        if (len(red.events), len(red.header.memslots)) == before and _round:
            break
    red.replays = search.replays
    return red


def write_reduced(path: str, red: Reduction, inputs: Sequence[str], comment: str) -> None:
    """Write the reduced trace to ``path`` (never over an input; whole or not at all), ``comment`` first."""
    refuse_inputs(path, inputs)
    with TraceWriter(path) as w:  # atomic (kvmpfn.outputs.AtomicFile): a new file gets the umask's mode
        _write(w, red, comment)


def _write(w: TraceWriter, red: Reduction, comment: str) -> None:
    w.comment(comment)
    w.write_header(red.header)
    for e in red.events:
        w.write_event(e)


def describe(red: Reduction, command: str) -> str:
    """The comment line at the top of a reduced trace: how it was made."""
    return (
        f"reduced by `{command}` from {red.original} to {len(red.events)} events "
        f"({red.replays} replays; steps: {'; '.join(red.steps) or 'none'})"
    )


@dataclass
class Goal:
    """What a reduction keeps: a finding (``finding``, with its subject kind) or a divergence (``compare``)."""

    test: Test
    finding: dict | None
    what: str


def choose_goal(
    header: ev.Header,
    events: list,
    options: ReplayOptions,
    keep: str | None = None,
    compare: tuple[ReplayOptions, ReplayOptions] | None = None,
) -> Goal:
    """The goal of reducing this trace: under ``compare``, that the two option sets still disagree; else the
    first finding (of code ``keep`` when given) of a replay under ``options``."""
    if compare is not None:
        if not keep_divergence(*compare)(header, events):
            raise ReduceError("the two option sets agree on this trace: no divergence to keep")
        return Goal(keep_divergence(*compare), None, "divergence")
    run = replay_events(header, events, options)
    if run.error is not None:
        raise ReduceError(f"the trace stops on an input error: {run.error}")
    found = [f for f in run.findings if keep is None or f["code"] == keep]
    if not found:
        codes = ", ".join(run.by_code()) or "none"
        raise ReduceError(f"no {keep or 'finding'} to keep (findings: {codes})")
    kind = subject_kind(found[0])
    what = kind[0] + (f" on {'/'.join(kind[1:])}" if kind[1:] else "")
    return Goal(keep_finding(options, kind), found[0], what)
