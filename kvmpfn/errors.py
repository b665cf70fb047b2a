"""Every error kvmpfn raises, under one base, by what the command line does with it.

- :class:`InputError`: the user's input is wrong (a trace line, a baseline, an option): exit status 2, one
  line naming the file, line and field.
- :class:`KernelBug`: the simulated kernel hit a ``BUG()``/``BUG_ON()`` (only reachable under a ``--bug``
  mutant): a ``kernel-bug`` finding, not an input error.
- :class:`InternalError`: kvmpfn's own structures disagree: a defect in kvmpfn.

The command line catches :class:`KvmpfnError` once, at its boundary (``kvmpfn.cli``); anything else is a
defect and is shown as one line (``--debug`` shows the traceback).
"""

from __future__ import annotations


class KvmpfnError(Exception):
    """The base of every error kvmpfn raises on purpose."""


class InputError(KvmpfnError, ValueError):
    """Input kvmpfn refuses. ``field`` names the field at fault (or ``None``), ``message`` says why."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message if field is None else f"{field}: {message}")
        self.field = field
        self.message = message


class KernelBug(KvmpfnError):
    """A BUG()/BUG_ON() the simulated kernel hit (only reachable under a ``--bug`` mutant or corrupted state).

    The message starts with the kernel function (``rmap_remove: ...``); ``spte`` is the entry it choked on."""

    def __init__(self, message: str, spte: int | None = None) -> None:
        super().__init__(message)
        self.spte = spte


class InternalError(KvmpfnError):
    """The simulator's own data structures disagree (``--paranoid``): a defect in kvmpfn."""
