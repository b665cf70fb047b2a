"""``kvmpfn hunt``: search for a trace on which the MMU with a historical bug behaves differently from the MMU
without it, then reduce that trace (:mod:`kvmpfn.reduce`).

Random workloads reach few of the bugs' code paths, so the search is coverage-guided, as syzkaller's fuzzer
is: every ``--bug`` switch is a ``"name" in kvm.bugs`` test at the exact place the kernel had the bug, and
during a hunt ``kvm.bugs`` is a :class:`ProbedBugs` set that records where (file and line) the hunted name is
tested and how often. A candidate trace whose probe sites, hit counts (in powers of two), outcome results or
divergence from the clean MMU are new joins the corpus; later candidates are mutations and splices of corpus
traces, or fresh traces from :class:`GuestGen`, a generator of small guests built to collide: a few page
tables at low frames, a few indices per level, large pages, second memslots of every backing, slot changes,
dirty logging, host remaps, injected failures and feature toggles.

A candidate *kills* the bug when it replays clean (no finding, no input error) without the bug and with a
finding under it; a candidate whose outcome records differ but whose findings do not is a *blind spot*.
The search is deterministic for a seed: the same seed visits the same candidates in the same order, and
``budget`` only decides how many of them there is time for.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from msgspec.structs import replace as evolve

from kvmpfn import native
from kvmpfn.errors import InternalError
from kvmpfn.reduce import Reduction, keep_divergence, keep_kill, reduce_trace, replay_events, subject_kind
from kvmpfn.replay import ReplayOptions
from kvmpfn.trace import events as ev

P, W, U, A, D, PS = 1, 2, 4, 1 << 5, 1 << 6, 1 << 7
NX = 1 << 63
ROOTS = (0x1000, 0x7000)
TABLES = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000, 0x8000)
DATA = tuple(range(0x10000, 0x18000, 0x1000))
LARGE = (0x0, 0x200000, 0x400000, 0x600000, 0x800000, 0xC00000)
INNER_TABLES = (0x401000, 0x801000)  # tables inside a large page: shadowing one write-protects that page
HIGH_GFN = 0x100000  # 4 GiB: a slot above it reaches gpas that do not fit 32 bits
SECOND_SLOT_GFNS = (0x1000, 0x1100, 0x2000, HIGH_GFN)
BACKINGS = ("ram", "hugetlb", "reserved", "mmio")
KERNELS = ("page", "pfn", "pfn-io", "notifier")


class ProbedBugs(frozenset):
    """The set of bug switches, recording where the hunted ``name`` is tested (``"name" in kvm.bugs``) and how
    often. Only a hunt passes one; every other replay has a plain frozenset, so the probe costs nothing."""

    name: str
    hits: Counter

    def __new__(cls, names: frozenset[str], name: str) -> ProbedBugs:
        self = super().__new__(cls, names)
        self.name, self.hits = name, Counter()
        return self

    def __contains__(self, item: object) -> bool:
        if item == self.name:
            caller = sys._getframe(1)
            where = "/".join(caller.f_code.co_filename.rsplit("/", 2)[-2:])  # kvm/pte_write.py
            self.hits[f"{where}:{caller.f_lineno}"] += 1
        return frozenset.__contains__(self, item)


@dataclass
class GuestGen:
    """Random small guests and their events: page tables at :data:`TABLES`, data at :data:`DATA` and the
    large-page frames :data:`LARGE`, indices 0-3 and the last at every level so walks collide."""

    rng: random.Random
    mmu: str | None = None  # fixed by --mmu, else chosen per trace

    def header(self) -> ev.Header:
        r = self.rng
        paging = r.choice(("none", "32", "pae", "64", "64"))
        guest = ev.Guest(
            paging=paging,
            cr3=0 if paging == "none" else ROOTS[0],
            cr0_wp=r.random() < 0.7,
            efer_nx=r.random() < 0.7,
            cr4_pse=r.random() < 0.8,
            cr4_smep=r.random() < 0.1,
            cr4_smap=r.random() < 0.1,
            gbpages=r.random() < 0.1,
        )
        npages = r.choice((0x1000, 0x2000))
        backing = r.choice(("ram", "hugetlb"))
        if r.random() < 0.3:  # the low 1 MiB apart, the rest a slot whose start is not 2 MiB-aligned
            slots = [
                ev.Memslot(slot=0, gfn=0, npages=0x100, backing="ram"),
                ev.Memslot(slot=3, gfn=0x100, npages=npages - 0x100, backing=backing),
            ]
        else:
            slots = [ev.Memslot(slot=0, gfn=0, npages=npages, backing=backing)]
        if r.random() < 0.5:
            gfn = r.choice(SECOND_SLOT_GFNS)
            gfn = max(gfn, npages) if gfn < HIGH_GFN else gfn
            slots.append(ev.Memslot(slot=1, gfn=gfn, npages=r.choice((0x200, 0x800)), backing=r.choice(BACKINGS)))
        return ev.Header(
            kvmpfn=1,
            mmu=self.mmu or r.choice(("shadow", "shadow", "tdp")),
            guest=guest,
            memslots=slots,
            kernel=r.choice(KERNELS),
        )

    def events(self, header: ev.Header, n: int) -> list:
        out = []
        if header.guest.paging == "pae":
            out += [ev.Write(gpa=ROOTS[0] + 8 * i, val=TABLES[1 + i] | P, len=8) for i in range(2)]
            out.append(ev.Cr3(val=ROOTS[0]))
        for _ in range(n):
            out += self.event(header)
        out.append(ev.Audit())
        return out

    def map(self, header: ev.Header, vcpu: int) -> list:
        """The guest maps a gva: one pte write per level of the walk from the first root (tables picked from
        :data:`TABLES`, so different gvas share tables), the last a 4K frame or a large page."""
        r = self.rng
        paging = header.guest.paging
        levels = {"32": (22, 12), "pae": (30, 21, 12), "64": (39, 30, 21, 12)}.get(paging)
        if levels is None:
            return [self.access(header, vcpu)]
        size = 4 if paging == "32" else 8
        bits = 10 if size == 4 else 9
        table, gva, out = ROOTS[0], 0, []
        for depth, shift in enumerate(levels):
            index = self._index(2 if paging == "pae" and depth == 0 else bits)
            gva |= index << shift
            last = depth == len(levels) - 1
            large = not last and shift in (21, 22) and r.random() < 0.25
            if last or large:
                flags = P | W * (r.random() < 0.7) | U * (r.random() < 0.7) | A * (r.random() < 0.5)
                # a large page over the tables (0), or one with a table inside, often the same one again
                target = r.choice((0x400000, 0x800000, r.choice(LARGE))) | PS if large else r.choice(DATA)
                val = target | flags | D * (r.random() < 0.3)
            else:
                target = TABLES[min(depth + 1 + 3 * (r.random() < 0.2), len(TABLES) - 1)]
                if r.random() < 0.15:
                    target = r.choice(INNER_TABLES)
                flags = P | (0 if paging == "pae" and depth == 0 else W | U | A * (r.random() < 0.5))
                val = target | flags
            if r.random() < 0.1 and size == 8 and not (paging == "pae" and depth == 0):
                val |= NX
            out.append(ev.Write(gpa=table + index * size, val=val, len=size, vcpu=vcpu))
            if last or large:
                break
            table = target
        if gva >> 47:
            gva |= 0xFFFF << 48
        out.append(ev.Access(addr=gva, write=r.random() < 0.5, user=r.random() < 0.6, fetch=False, vcpu=vcpu))
        return out

    def access(self, header: ev.Header, vcpu: int) -> ev.Access:
        r = self.rng
        return ev.Access(
            addr=self.gva(header.guest.paging),
            write=r.random() < 0.5,
            user=r.random() < 0.5,
            fetch=r.random() < 0.1,
            ac=r.random() < 0.05,
            vcpu=vcpu,
        )

    def _index(self, bits: int) -> int:
        return self.rng.choice((0, 0, 1, 1, 2, 3, (1 << bits) - 1))

    def gva(self, paging: str) -> int:
        r = self.rng
        if paging == "none":
            return self.gpa(header_slots=None)
        if paging == "32":
            return self._index(10) << 22 | self._index(10) << 12 | r.choice((0, 8))
        if paging == "pae":
            return self._index(2) << 30 | self._index(9) << 21 | self._index(9) << 12 | r.choice((0, 8))
        gva = self._index(9) << 39 | self._index(9) << 30 | self._index(9) << 21 | self._index(9) << 12
        if gva >> 47:
            gva |= 0xFFFF << 48  # canonical
        return gva | r.choice((0, 8))

    def gpa(self, header_slots=None) -> int:
        r = self.rng
        x = r.random()
        if x < 0.3:
            return r.choice(DATA) | r.choice((0, 8))
        if x < 0.6:
            return r.choice(LARGE) | r.choice((0, 0x1000, 0x8))
        if x < 0.8:
            return (r.choice(SECOND_SLOT_GFNS) + r.randrange(8) * 0x100) << 12 | r.choice((0, 0x1000))
        return r.choice(TABLES)

    def pte(self, paging: str) -> tuple[int, int]:
        """A guest pte value and its size: a table, a data frame or a large page, with random flags."""
        r = self.rng
        x = r.random()
        flags = (P if r.random() < 0.9 else 0) | (W if r.random() < 0.6 else 0) | (U if r.random() < 0.6 else 0)
        flags |= (A if r.random() < 0.5 else 0) | (D if r.random() < 0.3 else 0)
        if x < 0.4:
            target = r.choice(TABLES + INNER_TABLES)
        elif x < 0.75:
            target = r.choice(DATA)
        else:
            target = r.choice(LARGE)
            flags |= PS
        if x >= 0.9:
            target = r.choice(SECOND_SLOT_GFNS) << 12
        size = 4 if paging == "32" else 8
        val = target | flags
        if size == 8:
            if r.random() < 0.15:
                val |= NX
            if r.random() < 0.05:
                val |= r.choice((1 << 51, 1 << 13, 1 << 62))
        return val & ((1 << 8 * size) - 1), size

    def event(self, header: ev.Header) -> list:
        """One guest action: usually one event, a whole walk's pte writes for a mapping."""
        r = self.rng
        vcpu = 1 if r.random() < 0.15 else 0
        if r.random() < 0.15:
            return self.map(header, vcpu)
        if r.random() < 0.3:
            return [self.access(header, vcpu)]
        return [self.single(header, vcpu)]

    def single(self, header: ev.Header, vcpu: int):
        r = self.rng
        paging = header.guest.paging
        x = r.random()
        if x < 0.32:
            val, size = self.pte(paging)
            table = r.choice(TABLES + INNER_TABLES)
            index = self._index(10 if size == 4 else 9)
            gpa = table + index * size
            if r.random() < 0.1 and size == 8:
                size, val = 4, val & 0xFFFFFFFF  # a half pte
            cls = ev.PteWrite if r.random() < 0.3 else ev.Write
            return cls(gpa=gpa, val=val, len=size, vcpu=vcpu)
        if x < 0.68:
            return self.access(header, vcpu)
        if x < 0.71:
            return ev.Cr3(val=r.choice(ROOTS), vcpu=vcpu)
        if x < 0.76:
            name = r.choice(("cr0_wp", "cr0_wp", "efer_nx", "cr4_pse", "cr4_smep", "gbpages"))
            return ev.Paging(**{name: r.random() < 0.5}, vcpu=vcpu)
        if x < 0.78:
            return ev.Invlpg(addr=self.gva("64" if paging == "none" else paging), vcpu=vcpu)
        if x < 0.81:
            slot = r.choice((1, 1, 2))
            if r.random() < 0.4:
                return ev.MemslotEvent(slot=slot, gfn=0, npages=0)
            gfn = r.choice(SECOND_SLOT_GFNS[1:])
            return ev.MemslotEvent(slot=slot, gfn=gfn, npages=r.choice((0x200, 0x800)), backing=r.choice(BACKINGS))
        if x < 0.85:
            return ev.DirtyLog(slot=r.choice((0, 0, 1)), stop=r.random() < 0.3)
        if x < 0.89:
            return ev.HostRemap(gfn=self.gpa() >> 12)
        if x < 0.92:
            return ev.Inject(fault=r.choice(("enomem", "gup_fail", "pte_race")), count=r.choice((1, 1, 2)))
        if x < 0.97:
            return ev.Audit()
        err = r.choice((0, 1)) | r.choice((0, 2)) | r.choice((0, 4)) | r.choice((0, 16))
        addr = self.gpa() if header.mmu == "tdp" else self.gva(paging)
        return ev.Pf(addr=addr, err=err, vcpu=vcpu)


@dataclass
class Candidate:
    header: ev.Header
    events: list
    weight: float = 1.0


@dataclass
class HuntResult:
    """What a hunt found: ``verdict`` killed, blind spot or survived; the trace that showed it, reduced."""

    bug: str
    verdict: str = "survived"
    seconds: float = 0.0
    candidates: int = 0
    corpus: int = 0
    sites: dict[str, int] = field(default_factory=dict)  # probe site -> hits over the whole hunt
    found: Candidate | None = None
    reduced: Reduction | None = None
    finding: dict | None = None


def _evaluate(cand: Candidate, base: ReplayOptions, bug: str):
    """Replay ``cand`` with the probed bug and, when the bug's switch was reached, without it. Returns
    (the candidate as far as it is valid, probe hits, mutant run, clean run or None)."""
    events = cand.events
    for _ in range(3):
        probe = ProbedBugs(base.bugs | {bug}, bug)
        mut = replay_events(cand.header, events, replace(base, bugs=probe), records=True)
        if mut.error is None:
            break
        if mut.at < 0:
            return None
        events = events[: mut.at]
    else:
        return None
    cand = Candidate(cand.header, events, cand.weight)
    if not probe.hits:
        return cand, probe.hits, mut, None  # the switch was never tested: the clean run is the same
    clean = replay_events(cand.header, events, base, records=True)
    return cand, probe.hits, mut, clean if clean.error is None else None


def _features(hits: Counter, mut, clean) -> set:
    feats = {("site", site, int(math.log2(n))) for site, n in hits.items()}
    feats |= {("result", r["op"], r["result"]) for r in mut.records}
    feats |= {("code", code) for code in mut.by_code()}
    if clean is not None and mut.records != clean.records:
        first = next((a for a, b in zip(mut.records, clean.records, strict=False) if a != b), mut.records[-1])
        feats.add(("diverge", first["op"], first["result"]))
    return feats


def _mutate(rng: random.Random, gen: GuestGen, cand: Candidate, corpus: Sequence[Candidate]) -> Candidate:
    header, events = cand.header, list(cand.events)
    for _ in range(rng.choice((1, 1, 2, 4))):
        x = rng.random()
        pos = rng.randrange(len(events) + 1)
        if x < 0.35:
            events[pos:pos] = [e for _ in range(rng.choice((1, 1, 3))) for e in gen.event(header)]
        elif x < 0.5 and events:
            del events[min(pos, len(events) - 1)]
        elif x < 0.6 and events:
            e = events[min(pos, len(events) - 1)]
            events.insert(pos, e)  # repeat an event (a second fault, a second write)
        elif x < 0.7 and events:
            i = min(pos, len(events) - 1)
            e = events[i]
            if isinstance(e, ev.Access):
                flag = rng.choice(("write", "user", "fetch"))
                events[i] = evolve(e, **{flag: not getattr(e, flag)})
            elif isinstance(e, ev.Write | ev.PteWrite):
                events[i] = evolve(e, val=e.val ^ rng.choice((P, W, U, A, D, PS)))
        elif x < 0.76 and header.guest.paging == "none":
            # (an access spliced in from another trace may carry a gva beyond every gfn)
            touched = [i for i, e in enumerate(events) if isinstance(e, ev.Access) and e.addr >> 12 < ev.GFN_LIMIT]
            if touched:
                i = rng.choice(touched)  # the host moves a frame the guest just used
                events.insert(i + 1, ev.HostRemap(gfn=events[i].addr >> 12))
        elif x < 0.82 and corpus:
            other = rng.choice(corpus)
            cut = rng.randrange(len(other.events) + 1)
            events = events[:pos] + other.events[cut:]
        elif x < 0.9:
            name = rng.choice(("kernel", "mmu", "cr0_wp", "efer_nx", "memslots"))
            fresh = gen.header()
            if name in ("kernel", "mmu", "memslots"):
                if name != "mmu" or gen.mmu is None:
                    header = evolve(header, **{name: getattr(fresh, name)})
            else:
                header = evolve(header, guest=evolve(header.guest, **{name: getattr(fresh.guest, name)}))
        else:
            events.append(ev.Audit())
    return Candidate(header, events[:400])


def hunt(
    bug: str,
    base: ReplayOptions | None = None,
    *,
    seed: int = 0,
    budget: float = 120.0,
    corpus: Sequence[tuple[ev.Header, list]] = (),
    mmu: str | None = None,
    progress: Callable[[int, str], None] = lambda done, what: None,
    clock: Callable[[], float] = time.monotonic,
) -> HuntResult:
    """Search for a trace that kills ``bug`` within ``budget`` seconds, then reduce it. The probe
    (:class:`ProbedBugs`) reads the caller's source line: only the pure-Python simulator has one
    (``KVMPFN_PURE=1``; ``kvmpfn hunt`` sets it itself). Without ``mmu`` (nor one in ``base``), a bug of one MMU
    is hunted under that MMU alone."""
    if native.MODE == "compiled":
        raise InternalError("hunt needs the pure-Python simulator: run it with KVMPFN_PURE=1 in the environment")
    from kvmpfn.kvm.bugs import BUGS

    base = base or ReplayOptions()
    if mmu is None and base.mmu is None and len(BUGS[bug].mmu) == 1:
        mmu = BUGS[bug].mmu[0]  # traces of the other MMU never reach the bug's code
    rng = random.Random(f"kvmpfn-hunt/{bug}/{seed}")
    gen = GuestGen(rng, mmu)
    result = HuntResult(bug)
    start = clock()
    pool: list[Candidate] = [Candidate(h, list(evs), 2.0) for h, evs in corpus]
    seen: set = set()
    blind: Candidate | None = None
    queue = list(pool)
    while clock() - start < budget:
        result.candidates += 1
        if queue:
            cand = queue.pop(0)
        elif not pool or rng.random() < 0.25:
            header = gen.header()
            cand = Candidate(header, gen.events(header, rng.choice((8, 16, 32, 64))))
        else:
            parent = rng.choices(pool, weights=[c.weight for c in pool])[0]
            cand = _mutate(rng, gen, parent, pool)
        if result.candidates % 64 == 0:
            progress(result.candidates, f"{bug}: corpus {len(pool)}, {len(result.sites)} sites")
        evaluated = _evaluate(cand, base, bug)
        if evaluated is None:
            continue
        cand, hits, mut, clean = evaluated
        for site in hits:
            result.sites[site] = result.sites.get(site, 0) + hits[site]
        if clean is not None and mut.by_code() != clean.by_code() and not clean.findings:
            result.verdict, result.found = "killed", cand
            kinds = [subject_kind(f) for f in mut.findings]
            result.finding = mut.findings[0]
            test = keep_kill(base, bug, kinds[0])
            result.reduced = reduce_trace(cand.header, cand.events, test, None)
            break
        feats = _features(hits, mut, clean) - seen
        if feats:
            seen |= feats
            diverged = any(f[0] == "diverge" for f in feats) or clean is not None and mut.records != clean.records
            weight = 1.0 + len(hits) + (8.0 if diverged else 0.0)
            pool.append(Candidate(cand.header, cand.events, weight))
            if diverged and blind is None and not clean.findings:
                blind = cand
    else:
        if blind is not None:
            result.verdict, result.found = "blind spot", blind
            mutant = replace(base, bugs=base.bugs | {bug})
            result.reduced = reduce_trace(blind.header, blind.events, keep_divergence(base, mutant), None)
    result.seconds = clock() - start
    result.corpus = len(pool)
    return result
