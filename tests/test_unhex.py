"""kvmpfn/trace/_unhex.c and its Python twin (kvmpfn/trace/unhex.py) rewrite the same bytes, byte for byte;
what they rewrite and what they leave alone."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpfn.trace.reader import _UNHEX_KEYS
from kvmpfn.trace.unhex import _lexed, unhex_py

try:
    from kvmpfn.trace._unhex import unhex as unhex_c
except ImportError:  # installed with KVMPFN_PURE_PYTHON=1
    unhex_c = None

KEYS = (b"addr", b"val", b"vcpu")
needs_c = pytest.mark.skipif(unhex_c is None, reason="installed with KVMPFN_PURE_PYTHON=1: _unhex.c was not built")
IMPLEMENTATIONS = [pytest.param(unhex_py, id="python"), pytest.param(unhex_c, id="c", marks=needs_c)]

#: pieces of trace lines, valid and broken: the rewrite must treat every mix of them alike in C and Python
PIECES = (
    [bytes([c]) for c in b'{}[],: \n\r\t\\"x0fFg']
    + [b'\\"', b'"0x', b'"addr"', b'"val"', b'"vcpu"', b'"t"', b'"op"', b'"0x1f"', b'"0xFFFFffff"', b'"0x"']
    + [b'"0xffffffffffffffff"', b'"0x10000000000000000"', b'"0x7g"', b'"pf"', b"\\u0061", b"\xc3\xa9"]
)


@needs_c
@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.integers(0, 3))
def test_c_and_python_rewrite_the_same_bytes(pieces, depth):
    data = b"".join(pieces)
    assert unhex_c(data, depth, KEYS) == unhex_py(data, depth, KEYS)


_SPACE = st.sampled_from([b"", b" ", b"\n", b" \t\r"])
_VALUE = st.sampled_from([b'"0x1f"', b'"0xFFFF"', b'"0x"', b'"0x1ffffffffffffffff"', b"7", b"true", b'"pf"', b'"a b"'])
_PAIR = st.tuples(_SPACE, st.sampled_from([b'"addr"', b'"val"', b'"t"', b'"label"', b'"0x1"']), _SPACE, _VALUE)
_OBJECT = st.lists(_PAIR, max_size=5).map(
    lambda ps: b"{" + b",".join(k + s1 + b":" + s2 + v for s1, k, s2, v in ps) + b"}"
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(_OBJECT, min_size=1, max_size=4), st.booleans())
def test_the_shortcut_for_flat_lines_rewrites_what_lexing_does(objects, block):
    """unhex_py's shortcut (a flat line or block) against its lexer, and against C when built."""
    data, depth = (b"[" + b",\n".join(objects) + b"]", 2) if block else (objects[0] + b"\n", 1)
    assert unhex_py(data, depth, KEYS) == _lexed(data, depth, KEYS)
    if unhex_c is not None:
        assert unhex_c(data, depth, KEYS) == _lexed(data, depth, KEYS)


@needs_c
@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3))
def test_c_and_python_agree_on_any_bytes(data, depth):
    assert unhex_c(data, depth, KEYS) == unhex_py(data, depth, KEYS)


@pytest.mark.parametrize("unhex", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"op": "pf", "addr": "0x7f001000", "vcpu": "0x1"}', b'{"op": "pf", "addr": 2130710528, "vcpu": 1}'),
        (b'{"val":"0xFFFFFFFFFFFFFFFF"}', b'{"val":18446744073709551615}'),
        (b'{"val" : "0x0A" }', b'{"val" : 10 }'),
        # 17 digits, no digits, not hex, uppercase 0X, a decimal string: left for the slow path to judge
        (b'{"val": "0x1ffffffffffffffff"}', None),
        (b'{"val": "0x"}', None),
        (b'{"val": "0x1g"}', None),
        (b'{"val": "0X1f"}', None),
        (b'{"val": "31"}', None),
        # not an integer field, a nested value, a key, an array item, a string inside a string
        (b'{"op": "pf", "label": "0x1f"}', None),
        (b'{"t": "0x1f", "x": {"addr": "0x1f"}}', None),
        (b'{"0x1f": 1}', None),
        (b'{"addr": ["0x1f"]}', None),
        (b'{"label": "\\"addr\\": \\"0x1f\\""}', None),
        # broken lines stay broken
        (b'{"addr": "0x1f"x}', None),
        (b'{"addr": "0x1f', None),
        (b'["addr": "0x1f"]', b'["addr": 31]'),  # not an object, but invalid either way
    ],
)
def test_what_is_rewritten(unhex, line, expected):
    out = unhex(line, 1, KEYS)
    assert out == (line if expected is None else expected)
    if expected is not None and line.startswith(b"{"):
        assert json.loads(out) == {k: int(v, 16) if k.encode() in KEYS else v for k, v in json.loads(line).items()}


@pytest.mark.parametrize("unhex", IMPLEMENTATIONS)
def test_a_block_is_rewritten_two_deep(unhex):
    block = b'[{"op": "cr3", "val": "0x1000"},\n{"op": "pf", "addr": "0x2000", "x": {"val": "0x3"}}]'
    assert unhex(block, 2, KEYS) == b'[{"op": "cr3", "val": 4096},\n{"op": "pf", "addr": 8192, "x": {"val": "0x3"}}]'
    assert unhex(block, 1, KEYS) == block


def test_the_keys_are_the_integer_fields_of_the_events():
    assert _UNHEX_KEYS == tuple(sorted(_UNHEX_KEYS))
    assert {b"addr", b"err", b"gpa", b"val", b"len", b"vcpu", b"gfn", b"count"} <= set(_UNHEX_KEYS)
    assert not {b"t", b"x", b"op", b"label", b"write", b"fault"} & set(_UNHEX_KEYS)
