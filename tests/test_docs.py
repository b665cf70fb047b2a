"""The repository documents itself: every example in docs/ is replayed, every citation resolves to a heading of a
file in docs/, the docs tables agree with kvmpfn.vocab and kvmpfn.kvm.bugs, and nothing points outside the
repository."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import msgspec
import pytest

from kvmpfn import vocab
from kvmpfn.kvm.bugs import BUGS
from kvmpfn.replay import ReplayOptions, replay_file
from kvmpfn.trace import events

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TRACE_FORMAT = DOCS / "trace-format.md"
KERNEL = DOCS / "kernel.md"

#: What may not appear in the repository: paths and documents outside it.
OUTSIDE = re.compile(r"\.\./shared|/work/shared|TRACE_FORMAT|DESIGN\.md|STYLE\.md|reference §|kvm-2008-mmu")
#: A citation of a doc: ``docs/kernel.md`` optionally followed by ``, Heading`` (and ``: Sub-heading``).
CITATION = re.compile(r"docs/([\w.-]+\.md)(,[ \n])?")


def blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """The fenced blocks of ``lang`` in ``path``: (line number of the fence, text)."""
    text = path.read_text()
    found = []
    for m in re.finditer(rf"^```{lang}\n(.*?)^```$", text, re.M | re.S):
        found.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return found


def headings(path: Path) -> list[str]:
    """The headings of a markdown file, without ``#`` marks and backticks."""
    return [h.replace("`", "").strip() for h in re.findall(r"^#{1,6} (.+)$", path.read_text(), re.M)]


def repo_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [ROOT / p for p in out.stdout.splitlines() if (ROOT / p).is_file()]


def text_files() -> list[tuple[Path, str]]:
    files = []
    for path in repo_files():
        try:
            files.append((path, path.read_text()))
        except UnicodeDecodeError:
            continue  # binary (compressed traces, cores)
    return files


def replay_text(tmp_path: Path, text: str, name: str = "example.jsonl"):
    trace = tmp_path / name
    trace.write_text(text)
    emit = io.StringIO()
    result = replay_file(str(trace), ReplayOptions(), emit=emit)
    return result, emit.getvalue()


def as_trace(block: str) -> str:
    """A block of event lines gets the minimal header; a block that starts with a header is a whole trace."""
    return block if block.startswith('{"kvmpfn"') else '{"kvmpfn": 1}\n' + block


# -- the examples are real ---------------------------------------------------------------------------------

EXAMPLES = [(path, line, block) for path in sorted(DOCS.glob("*.md")) for line, block in blocks(path, "jsonl")]


@pytest.mark.parametrize(("path", "line", "block"), EXAMPLES, ids=[f"{p.name}:{n}" for p, n, _ in EXAMPLES])
def test_example_replays(tmp_path, path, line, block):
    result, emitted = replay_text(tmp_path, as_trace(block))
    assert result.error is None, f"{path.name}:{line}: {result.error}"
    event_lines = [x for x in as_trace(block).splitlines()[1:] if x.strip() and not x.lstrip().startswith("#")]
    assert result.events == len(event_lines)
    assert [json.loads(r)["op"] for r in emitted.splitlines()] == [json.loads(x)["op"] for x in event_lines]


def _following(path: Path, lang: str) -> list[tuple[str, str]]:
    """Each ``lang`` block of ``path`` with the ``jsonl`` trace before it."""
    text = path.read_text()
    pairs = []
    for m in re.finditer(rf"^```{lang}\n(.*?)^```$", text, re.M | re.S):
        before = re.findall(r"^```jsonl\n(.*?)^```$", text[: m.start()], re.M | re.S)
        assert before, f"a {lang} block without a trace before it"
        pairs.append((before[-1], m.group(1)))
    return pairs


def test_outcome_records_are_what_replay_emits(tmp_path):
    pairs = _following(TRACE_FORMAT, "outcomes")
    assert pairs
    for trace, records in pairs:
        result, emitted = replay_text(tmp_path, as_trace(trace))
        assert emitted == records


def test_findings_are_what_replay_finds(tmp_path):
    pairs = _following(TRACE_FORMAT, "findings")
    assert pairs
    for trace, findings in pairs:
        result, _ = replay_text(tmp_path, as_trace(trace))
        assert result.findings == [json.loads(x) for x in findings.splitlines()]


def test_every_event_has_a_section_and_an_example():
    assert tuple(events.EVENT_TYPES) == vocab.OPS
    titles = headings(TRACE_FORMAT)
    examples = {json.loads(x)["op"] for _, b in blocks(TRACE_FORMAT, "jsonl") for x in b.splitlines() if '"op"' in x}
    for op in vocab.OPS:
        assert op in titles, op
        assert op in examples, op


def _table_fields(text: str) -> set[str]:
    """The first column of every table row whose cell starts with a field name in backticks."""
    names = set()
    for cell in re.findall(r"^\| ([^|]+) \|", text, re.M):
        names.update(re.findall(r"`([a-z_0-9]+)`", cell))
    return names


def test_every_field_is_documented():
    documented = _table_fields(TRACE_FORMAT.read_text())
    structs = [events.Header, events.Guest, events.Memslot, events.HostConfig, *events.EVENT_TYPES.values()]
    for struct in structs:
        for field in msgspec.structs.fields(struct):
            assert field.encode_name in documented, f"{struct.__name__}.{field.encode_name}"


def test_example_lines_are_checked():
    """Every line that looks like a trace line sits in a jsonl block (and so is replayed above)."""
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        outside = re.sub(r"^```(jsonl|outcomes|findings|json)\n.*?^```$", "", text, flags=re.M | re.S)
        assert not re.search(r'^\{"(op|kvmpfn)"', outside, re.M), path.name


# -- the tables agree with the vocabulary -------------------------------------------------------------------


def table_rows(path: Path, first_header: str) -> list[list[str]]:
    """The body rows of the table whose first column is headed ``first_header``."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"| {first_header} |"):
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split(" | ")])
            return rows
    raise AssertionError(f"no table headed {first_header!r} in {path.name}")


def test_findings_table_is_the_vocabulary():
    rows = table_rows(TRACE_FORMAT, "code")
    table = {r[0].strip("`"): (r[1], r[2], r[3]) for r in rows}
    assert list(table) == list(vocab.CODES)
    for name, code in vocab.CODES.items():
        assert table[name] == (code.invariant or "—", code.subject, code.check), name


def test_kernel_variants_table_is_the_vocabulary():
    rows = table_rows(KERNEL, "kernel")
    assert [r[0].strip("`") for r in rows] == list(vocab.KERNELS)
    for row in rows:
        variant = vocab.KERNEL_VARIANTS[row[0].strip("`")]
        assert (row[1], row[2], row[3]) == variant


def test_bugs_table_is_the_bug_list():
    rows = table_rows(KERNEL, "bug")
    assert [r[0].strip("`") for r in rows] == list(BUGS)
    for row in rows:
        bug = BUGS[row[0].strip("`")]
        assert (row[1], row[2], row[3]) == (", ".join(bug.mmu), ", ".join(bug.kernels), bug.text)


def test_every_bug_and_invariant_has_its_section():
    section = KERNEL.read_text().split("\n## Historical bugs", 1)[1].split("\n## ", 1)[0]
    bug_headings = re.findall(r"^### `?([a-z0-9-]+)`?$", section, re.M)
    assert bug_headings == list(BUGS)
    invariants = KERNEL.read_text().split("\n## Invariants", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^### (I\d+): (.+)$", invariants, re.M)
    assert dict(found) == {k: v[0].upper() + v[1:] for k, v in vocab.INVARIANTS.items()}


def test_every_finding_code_has_an_example_trace():
    from kvmpfn.report.codes import example_trace

    for name in vocab.CODES:
        assert example_trace(name).is_file(), name


# -- the repository stands alone ----------------------------------------------------------------------------


def test_nothing_refers_outside_the_repository():
    bad = []
    for path, text in text_files():
        if path == Path(__file__):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad[:40])


def resolve(doc: str, rest: str) -> str | None:
    """Why the citation ``docs/DOC, REST...`` does not resolve, or None when it does. ``rest`` must start
    with a heading of the file, optionally followed by ``: `` and another heading of it."""
    path = DOCS / doc
    if not path.is_file():
        return f"no docs/{doc}"
    titles = sorted(headings(path), key=len, reverse=True)
    rest = rest.replace("`", "")
    head = next((t for t in titles if rest.startswith(t)), None)
    if head is None:
        return f"no heading of docs/{doc} starts {rest[:40]!r}"
    rest = rest[len(head) :]
    if rest.startswith(": {"):
        return None  # a template filled from kvmpfn.vocab, whose values the section tests check
    if rest.startswith(": "):
        token = re.match(r"[\w.-]*[\w]", rest[2:])
        if token is not None and not re.fullmatch(r"I\d+|\S*[-_]\S*", token.group()):
            return None  # prose after the heading, not a sub-heading (those are invariants, bugs, functions)
        if token is None or not any(re.match(re.escape(token.group()) + r"(\W|$)", t) for t in titles):
            return f"docs/{doc}, {head}: no heading starts {rest[2:32]!r}"
    return None


def test_every_citation_resolves():
    bad = []
    for path, text in text_files():
        for m in CITATION.finditer(text):
            n = text.count("\n", 0, m.start()) + 1
            if m.group(2) == ",\n":
                bad.append(f"{path.relative_to(ROOT)}:{n}: a citation broken across lines")
                continue
            doc = m.group(1)
            rest = text[m.end() : text.find("\n", m.end())] if m.group(2) else ""
            why = resolve(doc, rest) if m.group(2) else (None if (DOCS / doc).is_file() else f"no docs/{doc}")
            if why:
                bad.append(f"{path.relative_to(ROOT)}:{n}: {why}")
    assert not bad, "\n".join(bad[:40])


def test_the_citation_check_can_fail():
    assert resolve("kernel.md", "Invariants: I1") is None
    assert resolve("kernel.md", "Invariants: I99") is not None
    assert resolve("kernel.md", "Historical bugs: no-such-bug") is not None
    assert resolve("kernel.md", "Historical bugs: pfn-shift-32") is None
    assert resolve("kernel.md", "No such heading") is not None
    assert resolve("nothing.md", "Invariants") is not None
    assert OUTSIDE.search("see ../shared/TRACE_FORMAT.md") and OUTSIDE.search("(reference §5.2)")
