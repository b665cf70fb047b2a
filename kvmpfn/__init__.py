"""kvmpfn: replay and audit traces through a simulated 2008-era x86 KVM MMU that tracks host frames by pfn."""

__version__ = "0.1.0"
