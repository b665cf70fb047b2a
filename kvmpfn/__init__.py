"""kvmpfn: replay and audit traces through a simulated 2008-era x86 KVM MMU that tracks host frames by pfn."""

from kvmpfn import native  # noqa: F401 - chooses the compiled or the pure-Python simulator before it is imported

__version__ = "0.1.0"
