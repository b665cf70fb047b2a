"""``kvmpfn reduce`` (the smallest trace that still shows a finding) and ``kvmpfn hunt`` (search for a trace
that tells a historical bug apart); the work is in :mod:`kvmpfn.reduce` and :mod:`kvmpfn.hunt`."""

from __future__ import annotations

import os
import shlex
import sys
import time

import click

from kvmpfn import native
from kvmpfn.cli.options import (
    MMUS,
    check_bug_applies,
    fail,
    options_text,
    parse_replay_options,
    replay_options,
    suggest,
)
from kvmpfn.replay import ReplayOptions

REDUCE_EXAMPLES = """
\b
Examples:
  kvmpfn reduce big.jsonl.zst --bug same-pfn-no-release -o small.jsonl
  kvmpfn reduce big.jsonl --keep refcount-leak -o small.jsonl
  kvmpfn reduce big.jsonl --compare "--kernel pfn" "--kernel pfn-io" -o small.jsonl
"""

HUNT_EXAMPLES = """
\b
Examples:
  kvmpfn hunt --bug same-pfn-no-release -o found.jsonl
  kvmpfn hunt --bug tdp-gpa-32bit --mmu tdp --budget 300 --seed 7 -o found.jsonl
  kvmpfn hunt --bug cr0wp-shared-sp --corpus traces/ -o found.jsonl
"""


@click.command(epilog=REDUCE_EXAMPLES)
@click.argument("trace")
@replay_options
@click.option("--keep", metavar="CODE", help="Keep a finding of this code (default: the first finding).")
@click.option(
    "--compare",
    nargs=2,
    metavar="A B",
    help='Keep a divergence between two sets of replay options instead, e.g. --compare "--kernel pfn" "".',
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True), help="Reduced trace.")
def reduce(trace: str, options: ReplayOptions, keep: str | None, compare, output: str) -> None:
    """Write the smallest trace that still reproduces TRACE's finding: the same code on the same kind of
    subject (pfn, gfn, addr, ...), a kernel-bug among them; or, with --compare, a divergence of outcome
    records or findings between two option sets. Cuts after the event that detected the finding, starts from
    the events its provenance names, then delta-debugs the events and memslots and simplifies values.

    Exit status: 0 reduced, 2 nothing to keep or an input error.
    """
    from kvmpfn.audit.findings import CODES
    from kvmpfn.reduce import choose_goal, describe, load_trace, reduce_trace, write_reduced
    from kvmpfn.report.progress import progress

    if keep is not None and keep not in CODES:
        raise click.BadParameter(f"unknown code {keep!r}{suggest(keep, CODES)}", param_hint="'--keep'")
    if trace != "-" and not os.path.exists(trace):
        fail(f"{trace}: no such file")
    pair = None
    if compare:
        pair = (parse_replay_options(compare[0], "--compare A"), parse_replay_options(compare[1], "--compare B"))
    from kvmpfn.outputs import refuse_inputs

    refuse_inputs(output, [trace])
    start = time.monotonic()
    header, events = load_trace(trace)
    goal = choose_goal(header, events, options, keep, pair)
    with progress("reducing", unit="replays") as update:
        red = reduce_trace(header, events, goal.test, goal.finding, progress=update)
    words = ["kvmpfn", "reduce", trace, *shlex.split(options_text(options))]
    words += ["--keep", keep] if keep else []
    words += ["--compare", *compare] if compare else []
    write_reduced(output, red, [trace], describe(red, shlex.join(words)) + f"; keeps {goal.what}")
    seconds = time.monotonic() - start
    click.echo(
        f"{trace}: {red.original} -> {len(red.events)} events, keeps {goal.what} "
        f"({red.replays} replays, {seconds:.1f} s): {output}",
        err=True,
    )


def _check_bug(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from kvmpfn.kvm.bugs import BUGS

    if value not in BUGS:
        raise click.BadParameter(f"unknown bug {value!r}{suggest(value, BUGS)}; kvmpfn bugs lists them")
    return value


@click.command(epilog=HUNT_EXAMPLES)
@click.option("--bug", required=True, metavar="NAME", callback=_check_bug, help="The historical bug to hunt.")
@click.option(
    "--mmu",
    type=click.Choice(MMUS),
    help="Only traces of this MMU [default: the bug's, if it applies to one; else both].",
)
@click.option("--base", default="", metavar="OPTIONS", help='Replay options of both runs, e.g. "--kernel-audit".')
@click.option(
    "--budget", type=click.FloatRange(min=0, min_open=True), default=120, show_default=True, help="Seconds to search."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed: same seed, same search.")
@click.option("--corpus", "corpus_dir", metavar="DIR", help="Start from these traces (a directory or a file).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True), help="Found trace.")
def hunt(bug: str, mmu, base: str, budget: float, seed: int, corpus_dir, output: str) -> None:
    """Search for a trace on which the MMU with --bug behaves differently from the MMU without it, guided by
    which of the bug's code paths each trace reaches, and write it reduced: a killing trace (clean without
    the bug, a finding with it) or, if none is found within the budget, a blind spot (outcome records
    differ, findings do not).

    The summary names where the search reached the --bug check (the source line of kvmpfn's MMU that tests
    the switch, and how many times): never reached means no trace took the bug's code path.

    Exit status: 0 a killing trace written, 1 only a blind spot or nothing found, 2 usage error (among them a
    --mmu or --base kernel the bug does not apply to).
    """
    if native.MODE == "compiled":  # the probe reads source lines: hunt in the pure-Python simulator
        os.execve(sys.executable, [sys.executable, "-m", "kvmpfn", *sys.argv[1:]], {**os.environ, "KVMPFN_PURE": "1"})
    from kvmpfn.hunt import hunt as run_hunt
    from kvmpfn.outputs import refuse_inputs
    from kvmpfn.reduce import describe, write_reduced
    from kvmpfn.report.progress import progress

    base_opts = parse_replay_options(base, "--base")
    check_bug_applies(bug, mmu or base_opts.mmu, base_opts.kernel)
    refuse_inputs(output, [corpus_dir])
    seeds = _corpus(corpus_dir) if corpus_dir else []
    with progress(f"hunting {bug}", unit="traces") as update:
        result = run_hunt(bug, base_opts, seed=seed, budget=budget, corpus=seeds, mmu=mmu, progress=update)
    sites = _sites_text(result.sites)
    if result.reduced is None:
        click.echo(f"hunt {bug}: survived {result.candidates} traces in {result.seconds:.1f} s; {sites}", err=True)
        sys.exit(1)
    words = ["kvmpfn", "hunt", "--bug", bug, "--seed", str(seed)]
    words += ["--mmu", mmu] if mmu else []
    words += ["--base", base] if base else []
    comment = describe(result.reduced, shlex.join(words)) + f"; {result.verdict} after {result.candidates} traces"
    write_reduced(output, result.reduced, [corpus_dir] if corpus_dir else [], comment)
    click.echo(
        f"hunt {bug}: {result.verdict} by trace {result.candidates} in {result.seconds:.1f} s "
        f"({len(result.reduced.events)} events; {sites}): {output}",
        err=True,
    )
    sys.exit(0 if result.verdict == "killed" else 1)


def _sites_text(sites: dict[str, int]) -> str:
    """Where the hunt reached the bug's switch, in words."""
    if not sites:
        return "the --bug check was never reached"
    places = ", ".join(f"{site}, {n} time{'s' * (n != 1)}" for site, n in sorted(sites.items()))
    return f"the --bug check was reached at {places}"


def _corpus(path: str) -> list:
    """The traces under ``path`` (header and at most ``CORPUS_EVENTS`` events each) that can seed a hunt."""
    from kvmpfn import gate
    from kvmpfn.errors import KvmpfnError
    from kvmpfn.reduce import load_trace

    seeds = []
    for ref in gate.discover((path,)):
        try:
            header, events = load_trace(ref.path)
        except KvmpfnError:
            continue  # a trace that cannot seed (a memory image, bad input) is skipped
        seeds.append((header, events[:CORPUS_EVENTS]))
    return seeds


CORPUS_EVENTS = 400

COMMANDS = (reduce, hunt)
