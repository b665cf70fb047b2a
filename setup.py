"""Build kvmpfn. The simulator's packages (kvm/, host/, audit/) are compiled to C extensions with mypyc, the
trace reader's hex rewrite (kvmpfn/trace/_unhex.c) is a C extension, and each compiled source's SHA-256 is
recorded in ``kvmpfn/_compiled_sources.py`` (kvmpfn/native.py imports the Python sources instead once one of
them changes). ``KVMPFN_PURE_PYTHON=1`` installs without compiling.

See docs/architecture.md, Compiled modules.
"""

import glob
import hashlib
import os

from setuptools import Extension, setup

#: the packages compiled with mypyc: the simulated MMU, its host and its audit, type-checked by mypy --strict
COMPILED = ("kvm", "host", "audit")
#: C extensions written as C, each with a Python twin of the same behaviour
EXTENSIONS = [Extension("kvmpfn.trace._unhex", [os.path.join("kvmpfn", "trace", "_unhex.c")])]
RECORD = os.path.join("kvmpfn", "_compiled_sources.py")

if os.environ.get("KVMPFN_PURE_PYTHON"):
    if os.path.exists(RECORD):
        os.unlink(RECORD)
    setup()
else:
    from mypyc.build import mypycify

    sources = sorted(path for pkg in COMPILED for path in glob.glob(os.path.join("kvmpfn", pkg, "*.py")))
    c_sources = [path for ext in EXTENSIONS for path in ext.sources]
    with open(RECORD, "w", encoding="utf-8") as f:
        f.write('"""Written by setup.py: the compiled sources and their SHA-256 (kvmpfn/native.py)."""\n\n')
        f.write("SOURCES = {\n")
        for path in sources + c_sources:
            with open(path, "rb") as src:
                f.write(f'    "{os.path.relpath(path, "kvmpfn")}": "{hashlib.sha256(src.read()).hexdigest()}",\n')
        f.write("}\n")
    setup(ext_modules=mypycify(sources, opt_level="3", group_name="kvmpfn_native") + EXTENSIONS)
