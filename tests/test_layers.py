"""The package's layers (docs/architecture.md): a module imports only from its own layer or below, no module
imports form a cycle, and the simulator's layers import inside functions only where the kernel itself has the
cycle. A new module must be given its layer here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kvmpfn"

#: Lowest first. A top-level module or package of kvmpfn belongs to exactly one layer.
LAYERS: list[set[str]] = [
    {"kvmpfn", "kvmpfn.x86", "kvmpfn.errors", "kvmpfn.vocab", "kvmpfn.native", "kvmpfn._compiled_sources"},
    {"kvmpfn.limits"},
    {"kvmpfn.outputs"},
    {"kvmpfn.trace"},
    {"kvmpfn.host"},
    {"kvmpfn.kvm"},
    {"kvmpfn.audit"},
    {"kvmpfn.replay", "kvmpfn.synth"},
    {"kvmpfn.inspect"},
    {"kvmpfn.report"},
    {"kvmpfn.gate", "kvmpfn.mutants", "kvmpfn.runner", "kvmpfn.reduce", "kvmpfn.hunt"},
    {"kvmpfn.cli", "kvmpfn.__main__"},
]

#: Imports inside functions in the simulator's layers, each for a call cycle the kernel has too: mmu.c
#: includes paging_tmpl.h and holds rmap and the shadow-page code in one translation unit, so they call each
#: other both ways.
FUNCTION_LEVEL = {
    ("kvmpfn.kvm.rmap", "kvmpfn.kvm.mmu"),  # rmap_write_protect -> kvm_mmu_... and mmu -> rmap_add/remove
    ("kvmpfn.kvm.paging", "kvmpfn.kvm.pte_write"),  # FNAME(page_fault) <-> kvm_mmu_pte_write's guess
}
SIMULATOR = ("kvmpfn.x86", "kvmpfn.errors", "kvmpfn.trace", "kvmpfn.host", "kvmpfn.kvm", "kvmpfn.audit")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or path.is_dir()


def module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run at import: ``body`` and the blocks of its ``if`` and ``try`` statements."""
    out = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):
            out += module_level(node.body) + module_level(node.orelse)
        elif isinstance(node, ast.Try):
            blocks = [node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)]
            out += [stmt for block in blocks for stmt in module_level(block)]
    return out


def imports() -> list[tuple[str, str, bool]]:
    """(importer, imported, at module level) for every kvmpfn import in the package."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = module_name(path)
        tree = ast.parse(path.read_text())
        top = set(map(id, module_level(tree.body)))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [
                    f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")
                ]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name == "kvmpfn" or name.startswith("kvmpfn."):
                    out.append((mod, name, id(node) in top))
    return out


def unit(module: str) -> str:
    """The layer unit of a module: ``kvmpfn.kvm.mmu`` → ``kvmpfn.kvm``."""
    return ".".join(module.split(".")[:2])


def layer(module: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit(module) in units:
            return i
    raise AssertionError(f"{unit(module)} has no layer in tests/test_layers.py (and docs/architecture.md)")


def test_every_module_has_a_layer():
    assert all(0 <= layer(module_name(path)) < len(LAYERS) for path in ROOT.rglob("*.py"))


def test_no_import_reaches_up():
    upward = [
        f"{importer} imports {imported}" for importer, imported, _top in imports() if layer(imported) > layer(importer)
    ]
    assert upward == []


def test_no_import_cycle_at_module_level():
    graph: dict[str, set[str]] = {}
    for importer, imported, top in imports():
        if top and importer != imported:
            graph.setdefault(importer, set()).add(imported)
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif not state.get(nxt):
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    assert cycles == []


def test_function_level_imports_in_the_simulator_are_the_kernels_cycles():
    found = {
        (importer, imported)
        for importer, imported, top in imports()
        if not top and importer.startswith(SIMULATOR) and importer != imported
    }
    assert found == FUNCTION_LEVEL
