"""kvmpfn benchmarks: ``python -m bench`` (``make bench``) measures replay, decode, audit and corpus-gate speed
and memory and writes ``bench/results.json``. See bench/README.md."""
