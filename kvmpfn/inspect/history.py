"""The history of chosen host frames through a replay (``kvmpfn explain``).

:class:`FrameHistory` is a replay observer: chained after the auditor's ledger on the pfn API hook
(``gfn_to_pfn``, ``kvm_get_pfn``, ``kvm_release_pfn_clean|dirty``, ``kvm_set_pfn_accessed|dirty`` with the MMU
caller), on ``rmap_add``/``rmap_remove`` and on ``rmap_write_protect``, it records every step that touched a
chosen frame, the refcount after it, and each store to an spte that mapped it (old → new, compared after
every event). After each event it checks the frames' reference invariant (I1: every KVM reference is owned
by a present spte that maps the frame, none is released twice) and the mapping invariant (a present spte
maps the frame its gfn is backed by now), and marks the first step where one broke. The ledger keeps the
references; nothing here re-implements it.
"""

from __future__ import annotations

from kvmpfn.errors import InputError
from kvmpfn.inspect import FAULT_OPS, chain, sptep_text
from kvmpfn.kvm.spte import is_shadow_present_pte, spte_to_pfn
from kvmpfn.x86 import PAGE_SHIFT


class FrameHistory:
    """Replay observer: the steps that touched the frames ``pfns``, the frames behind ``gfns`` (whatever
    frame backs them at the time) and the frames that faults on the pages of ``gvas`` mapped."""

    records = True

    def __init__(self, pfns=(), gfns=(), gvas=()) -> None:
        self.pfns: set[int] = set(pfns)
        self.gfns: set[int] = set(gfns)
        self.gva_pages = {gva >> PAGE_SHIFT for gva in gvas}
        self.steps: list[dict] = []
        self.sptes: dict[tuple, tuple[int | None, int]] = {}  # tracked sptep -> (last value seen, its frame)
        self.spte_gfns: set[int] = set()  # gfns of sptes that mapped a tracked frame (for host remaps)
        self.broken: dict[int, set[str]] = {}  # pfn -> invariants already marked broken
        self.by_gfn: dict[int, set[int]] = {gfn: set() for gfn in gfns}  # the frames seen behind each gfn

    # -- hooks ---------------------------------------------------------------------------------------------

    def attach(self, rp) -> None:
        self.rp = rp
        self.kvm = kvm = rp.kvm
        self.host = rp.host
        self.ledger = rp.auditor.ledger
        self.findings = rp.findings
        self._prior = kvm.api.hook
        kvm.api.hook = self._api
        kvm.on_rmap_add = chain(kvm.on_rmap_add, self._rmap_add)
        kvm.on_rmap_remove = chain(kvm.on_rmap_remove, self._rmap_remove)
        kvm.on_write_protect = chain(kvm.on_write_protect, self._write_protect)

    def _step(self, kind: str, pfn: int, **fields) -> dict:
        f = self.findings
        frame = self.host.frames.get(pfn)
        step = {"seq": f.seq, "line": f.line, "event": f.point, "kind": kind, "pfn": f"{pfn:#x}", **fields}
        step["refcount"] = frame.count if frame is not None else 0
        step["kvm_refs"] = self.ledger.total(pfn)
        self.steps.append(step)
        return step

    def _tracked(self, pfn: int) -> bool:
        found = pfn in self.pfns
        for gfn in self.gfns:
            if pfn not in self.by_gfn[gfn] and self.host.peek_pfn(gfn) == pfn:
                self.by_gfn[gfn].add(pfn)
                self.pfns.add(pfn)
                found = True
        return found

    def _api(self, op: str, pfn: int, function: str, caller: str) -> None:
        held = self.ledger.total(pfn)
        if self._prior is not None:
            self._prior(op, pfn, function, caller)
        if not self._tracked(pfn):
            return
        step = self._step(op, pfn, function=function, caller=caller)
        if op == "get":
            step["_ref"] = self.ledger.refs[pfn][-1]
        elif op == "put" and held == 0:
            self._break(pfn, "underflow", step, f"{function} released frame {pfn:#x} but KVM held no reference (I1)")

    def _rmap_add(self, sptep: tuple, pfn: int) -> None:
        if pfn not in self.pfns:
            return
        sp, index = sptep
        old = self.sptes.get(sptep, (None, pfn))[0]
        new = sp.spt[index]
        self._step("rmap_add", pfn, caller="rmap_add", spte=self._spte(sptep, old, new), gfn=f"{sp.gfns[index]:#x}")
        self.sptes[sptep] = (new, pfn)
        self.spte_gfns.add(sp.gfns[index])

    def _rmap_remove(self, sptep: tuple, pfn: int, spte: int) -> None:
        if pfn not in self.pfns:
            return
        self._step("rmap_remove", pfn, caller="rmap_remove", spte=self._spte(sptep, spte, None))
        self.sptes[sptep] = (spte, pfn)

    def _write_protect(self, cleared) -> None:
        if not cleared:
            return
        for pfn in sorted(cleared & self.pfns):
            self._step("write_protect", pfn, function="rmap_write_protect", caller="rmap_write_protect")

    @staticmethod
    def _spte(sptep: tuple, old: int | None, new: int | None) -> dict:
        out: dict = {"where": sptep_text(sptep)}
        out["old"] = None if old is None else f"{old:#x}"
        out["new"] = None if new is None else f"{new:#x}"
        return out

    # -- after each event ------------------------------------------------------------------------------------

    def event(self, seq: int, line: int, e, rec: dict) -> bool:
        op = rec.get("op")
        if self.gva_pages and op in FAULT_OPS and e.addr >> PAGE_SHIFT in self.gva_pages and "pfn" in rec:
            self.pfns.add(int(rec["pfn"], 16))
        if op == "host_remap" and (e.gfn in self.gfns or e.gfn in self.spte_gfns):
            now = self.host.peek_pfn(e.gfn)
            before = {pfn for (sp, i), (_, pfn) in self.sptes.items() if sp.gfns[i] == e.gfn}
            before |= self.by_gfn.get(e.gfn, set())
            if e.gfn in self.gfns and now is not None:
                self.pfns.add(now)
                self.by_gfn[e.gfn].add(now)
            for pfn in sorted(before - {now}) or ([now] if now is not None else []):
                new = "none" if now is None else f"{now:#x}"
                self._step("host_remap", pfn, gfn=f"{e.gfn:#x}", now=new, caller="host_remap")
        self._settle()
        return False

    def finish(self, rp) -> None:
        self._settle()
        for step in self.steps:
            ref = step.pop("_ref", None)
            if ref is not None and any(r is ref for r in self.ledger.refs.get(int(step["pfn"], 16), ())):
                if not self._owned(ref, int(step["pfn"], 16)):
                    step["at_fault"] = "taken here, never given back"

    def _settle(self) -> None:
        """Record the stores to tracked sptes since the last look, then check the invariants."""
        for sptep, (old, pfn) in list(self.sptes.items()):
            sp, index = sptep
            new = sp.spt[index]
            if new == old:
                continue
            self._step("spte", pfn, spte=self._spte(sptep, old, new))
            if is_shadow_present_pte(new) and spte_to_pfn(new) == pfn:
                self.sptes[sptep] = (new, pfn)
            else:
                del self.sptes[sptep]
        for pfn in sorted(self.pfns):
            self._check(pfn)

    def _owned(self, ref, pfn: int) -> bool:
        if ref.owner is None:
            return False
        sp, index = ref.owner
        spte = sp.spt[index]
        alive = self.kvm.active_mmu_pages.get(sp.id) is sp
        return alive and is_shadow_present_pte(spte) and spte_to_pfn(spte) == pfn

    def _check(self, pfn: int) -> None:
        done = self.broken.get(pfn, ())
        if "orphan" not in done:
            orphans = [r for r in self.ledger.refs.get(pfn, ()) if not self._owned(r, pfn)]
            if orphans:
                n = len(orphans)
                message = f"frame {pfn:#x} holds {n} KVM reference{'s' * (n != 1)} that no present spte owns (I1)"
                self._break(pfn, "orphan", self._step("broken", pfn), message)
        if "stale" not in done:
            for sptep, (value, tracked) in self.sptes.items():
                sp, index = sptep
                if tracked != pfn or value is None or not is_shadow_present_pte(value):
                    continue
                now = self.host.peek_pfn(sp.gfns[index])
                if now is not None and now != pfn:
                    message = (
                        f"{sptep_text(sptep)} still maps frame {pfn:#x}, but gfn {sp.gfns[index]:#x} is now "
                        f"backed by {now:#x} (spte-hpa)"
                    )
                    self._break(pfn, "stale", self._step("broken", pfn), message)
                    break

    def _break(self, pfn: int, what: str, step: dict, message: str) -> None:
        self.broken.setdefault(pfn, set()).add(what)
        step["broken"] = message


class GvaFrames:
    """Replay observer: every frame the sptes of a guest-virtual page mapped (``explain --spte-of``)."""

    records = True

    def __init__(self, gva: int) -> None:
        self.page = gva >> PAGE_SHIFT
        self.pfns: set[int] = set()

    def attach(self, rp) -> None:
        pass

    def event(self, seq: int, line: int, e, rec: dict) -> bool:
        if rec.get("op") in FAULT_OPS and e.addr >> PAGE_SHIFT == self.page and "pfn" in rec:
            self.pfns.add(int(rec["pfn"], 16))
        return False

    def finish(self, rp) -> None:
        pass


# -- explain ---------------------------------------------------------------------------------------------------

FAULT_WORDS = {
    "refcount-underflow": "released here, but KVM held no reference on the frame",
    "dirty-lost": "released clean here: the frame's dirty bit is lost",
}


def finding_subject(finding: dict) -> dict:
    """What ``explain --finding`` follows for a finding: its frame (``pfn``, or the frame its ``spte`` maps),
    else its ``gfn``, else its guest-virtual ``addr``; empty when it names none of them (``write-count``)."""
    if "pfn" in finding:
        return {"pfn": int(finding["pfn"], 16)}
    if "spte" in finding:
        return {"pfn": spte_to_pfn(int(finding["spte"], 16))}
    if "gfn" in finding:
        return {"gfn": int(finding["gfn"], 16)}
    if "addr" in finding:
        return {"gva": int(finding["addr"], 16)}
    return {}


def explain(
    path: str,
    options,
    *,
    pfn: int | None = None,
    gfn: int | None = None,
    gva: int | None = None,
    finding: int | None = None,
) -> dict:
    """The history document of ``kvmpfn explain``: one frame (``pfn``), the frames behind a ``gfn``, the frames
    the sptes of ``gva`` mapped, or the subject of the replay's ``finding``-th finding (1-based, as
    ``kvmpfn replay`` numbers them), whose references at fault are marked.

    :raises InputError: ``finding`` is not a finding of this replay.
    """
    from kvmpfn.replay import replay_file

    doc: dict = {"version": 1, "trace": path}
    target = None
    if finding is not None:
        first = _replayed(replay_file(path, options))
        if first.interrupted:
            return _stopped(doc, first)
        findings = first.findings
        if not 1 <= finding <= len(findings):
            stopped = f" (it stopped at {first.error})" if first.error else ""
            raise InputError("--finding", f"{path}: the replay has {len(findings)} finding(s), not {finding}{stopped}")
        target = findings[finding - 1]
        doc["finding"] = {"number": finding, **target}
        subject = finding_subject(target)
        pfn, gfn, gva = subject.get("pfn"), subject.get("gfn"), subject.get("gva")
    doc["subject"] = {k: f"{v:#x}" for k, v in (("pfn", pfn), ("gfn", gfn), ("gva", gva)) if v is not None}
    pfns = set() if pfn is None else {pfn}
    if gva is not None:
        walk = GvaFrames(gva)
        found = _replayed(replay_file(path, options, observer=walk))
        if found.interrupted:
            return _stopped(doc, found)
        pfns |= walk.pfns
    history = FrameHistory(pfns, () if gfn is None else (gfn,))
    result = _replayed(replay_file(path, options, observer=history))
    return _document(doc, history.steps, sorted(history.pfns), result, target)


def _replayed(result):
    """``result``, unless its trace could not be opened or its header read: then that error alone."""
    if result.mmu is None and result.error:
        raise InputError(None, result.error)
    return result


def _stopped(doc: dict, result) -> dict:
    """The document of an explain whose replay looking for its frames was interrupted: no history yet."""
    doc.setdefault("subject", {})
    return _document(doc, [], [], result, None)


def _document(doc: dict, steps: list[dict], frames, result, target: dict | None) -> dict:
    """Finish an explain document: the finding placed and its references marked, the first broken step."""
    if target is not None:
        _mark_finding(steps, target)
    doc["frames"] = [f"{p:#x}" for p in frames]
    doc["events"] = result.events
    if result.interrupted:
        doc["interrupted"] = result.events  # Ctrl-C: the history covers the events before this one
    doc["error"] = result.error
    doc["steps"] = steps
    for step in steps:  # the teardown after the last event: no line of its own (seq and line: the last event's)
        if step["event"] == "teardown" and step["seq"] >= result.events:
            step["teardown"] = True
    broken = next((s for s in steps if s.get("broken")), None)
    if broken is not None:
        broken["first_broken"] = True
    keys = ("seq", "line", "pfn", "broken", "teardown")
    doc["first_broken"] = None if broken is None else {k: broken[k] for k in keys if k in broken}
    doc["at_fault"] = [i for i, s in enumerate(steps) if "at_fault" in s]
    return doc


def explain_findings(path: str, options, result, limit: int = 20) -> list[dict | None]:
    """The explain documents of the first ``limit`` findings of ``result`` (a replay of ``path``) from ONE more
    replay that follows all their frames at once (None for a finding whose subject is no frame or gfn)."""
    from kvmpfn.replay import replay_file

    findings = result.findings[:limit]
    subjects = [finding_subject(f) for f in findings]
    pfns = {s["pfn"] for s in subjects if "pfn" in s}
    gfns = {s["gfn"] for s in subjects if "gfn" in s}
    if not pfns and not gfns:
        return [None] * len(findings)
    history = FrameHistory(pfns, gfns)
    again = replay_file(path, options, observer=history)
    docs: list[dict | None] = []
    for number, (finding, subject) in enumerate(zip(findings, subjects, strict=True), 1):
        if "pfn" in subject:
            frames = {subject["pfn"]}
        elif "gfn" in subject:
            frames = history.by_gfn[subject["gfn"]]
        else:
            docs.append(None)
            continue
        wanted = {f"{p:#x}" for p in frames}
        steps = [dict(s) for s in history.steps if s["pfn"] in wanted]
        doc = {"version": 1, "trace": path, "finding": {"number": number, **finding}}
        doc["subject"] = {k: f"{v:#x}" for k, v in subject.items()}
        docs.append(_document(doc, steps, sorted(frames), again, finding))
    return docs


def _mark_finding(steps: list[dict], finding: dict) -> None:
    """Mark the steps behind a finding's provenance (the references at fault) and insert where it was
    detected."""
    code = finding["code"]
    for entry in finding.get("provenance") or ():
        for step in steps:
            if step["kind"] not in ("get", "put") or (step["seq"], step["line"]) != (
                entry.get("seq"),
                entry.get("line"),
            ):
                continue
            if (step.get("function"), step.get("caller")) != (entry.get("function"), entry.get("caller")):
                continue
            if step["kind"] == "put":
                step["at_fault"] = FAULT_WORDS.get(code, "released here")
            elif "at_fault" not in step:
                step["at_fault"] = "taken here: the reference behind the finding"
    where = len([s for s in steps if s["seq"] <= finding["seq"]])
    steps.insert(
        where,
        {
            "seq": finding["seq"],
            "line": finding["line"],
            "event": finding["point"],
            "kind": "finding",
            "code": code,
            "message": finding["message"],
        },
    )
