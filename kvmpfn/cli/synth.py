"""``kvmpfn synth``: the click command over :mod:`kvmpfn.synth` (registered by ``kvmpfn.cli``)."""

from __future__ import annotations

import sys

import click

from kvmpfn.synth import PAGINGS, WORKLOADS

SYNTH_EXAMPLES = """
\b
Examples:
  kvmpfn synth --workload steady --events 100000 -o steady.jsonl
  kvmpfn synth --workload fork-storm --events 1000000 --seed 7 -o big.jsonl.zst
  kvmpfn synth --workload hugepages --mmu tdp --paging 64 --events 50000 -o huge.jsonl.gz
"""


@click.command("synth", epilog=SYNTH_EXAMPLES)
@click.option("--workload", type=click.Choice(list(WORKLOADS)), required=True, help="What the guest does.")
@click.option("--events", type=click.IntRange(min=0), default=100_000, show_default=True, help="Trace length.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed: same seed, same bytes.")
@click.option(
    "--mmu", type=click.Choice(["shadow", "tdp"]), default="shadow", show_default=True, help="The header's MMU."
)
@click.option(
    "--paging",
    type=click.Choice(PAGINGS),
    help="Guest paging mode [default: 64; none for hugepages]. fork-storm needs 32, pae or 64.",
)
@click.option("--validate", is_flag=True, help="Decode every line back as the reader would while writing.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Trace file: .jsonl, .jsonl.gz, .jsonl.zst, or - for stdout.",
)
def synth(workload: str, events: int, seed: int, mmu: str, paging, validate: bool, output: str) -> None:
    """Generate a synthetic trace of EVENTS events that replays clean under a correct MMU.

    The guest builds its page tables in guest memory before it uses them; the same seed gives the same
    bytes, and the same guest actions under --mmu shadow and --mmu tdp. Generation streams: memory does
    not grow with --events.

    \b
    Workloads:
      boot         real mode, page tables built entry by entry, every page touched for the first time
      steady       a resident set mostly hitting existing mappings, with demand and protection faults
      fork-storm   bursts of pte writes to shadowed tables (fork, exit), copy-on-write re-faults
      remap-churn  host remaps (kernel notifier) interleaved with accesses
      hugepages    2 MiB mappings of a hugetlb slot, dirty logging switched on and off
    """
    from kvmpfn.report.progress import progress
    from kvmpfn.synth import SynthError, SynthSpec, write_synth

    spec = SynthSpec(workload, events, seed=seed, mmu=mmu, paging=paging)
    try:
        with progress("synthesizing", total=events, unit="events") as update:
            n = write_synth(output, spec, validate=validate, progress=lambda done: update(done, ""))
    except SynthError as err:
        click.echo(f"kvmpfn: error: {err}", err=True)
        sys.exit(2)
    except BrokenPipeError:
        raise  # the reader of standard output went away: the boundary exits quietly
    except OSError as err:
        click.echo(f"kvmpfn: error: {output}: {(err.strerror or str(err)).lower()}", err=True)
        sys.exit(2)
    if output != "-":
        click.echo(f"{output}: {n} events ({workload}, {mmu}, paging {spec.guest_paging}, seed {seed})", err=True)


COMMANDS = (synth,)
