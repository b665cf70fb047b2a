"""The host layer's input error."""

from __future__ import annotations

from kvmpfn.errors import InputError


class HostError(InputError):
    """A request the host (or KVM's memslot ioctl) refuses; the replay engine reports it as an input error.

    ``field`` names the trace field at fault (``"slot"``, ``"gfn"``, ``"npages"``, ``"backing"``,
    ``"host.first_pfn"``, ``"kernel"``), ``message`` says why in one line.
    """
