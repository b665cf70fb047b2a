"""Hex-string integers of event lines rewritten as JSON numbers, so that a trace written with ``"0x..."`` strings
decodes with the same typed decoder, at about the same cost, as one written with integers (the reader's fast
path, docs/architecture.md, Compiled modules).

``unhex(data, depth, keys)`` replaces a JSON string ``"0x"`` + 1 to 16 hex digits by the decimal digits of its
value when it is the value of one of ``keys`` in an object ``depth`` containers deep, and the byte after its
closing quote is ``,``, ``}``, ``]``, whitespace or the end; every other byte is copied. Strings are lexed as
JSON lexes them (a backslash escapes the next byte, a raw newline ends a string), so an invalid document stays
invalid and a string inside a string, a key or a nested annotation (``x``, ``t``) is never touched.

The C extension ``kvmpfn.trace._unhex`` does it in one pass; :func:`unhex_py` is its twin in Python, used when
the extension is not built or a compiled source changed since the build (kvmpfn/native.py), and tested byte for
byte against it (tests/test_unhex.py). The twin takes a shortcut when the data is a flat line or block (objects
of simple strings and literals, no escapes, no nesting: one regular expression says so), where a key is the
only string that a ``:`` can follow: there one more expression finds every rewrite; anything else is lexed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from kvmpfn import native

_STRING_BODY = re.compile(rb'(?:[^"\\\n]|\\[^\n]|\\)*')  # after an opening quote: up to the closing one
_HEX = re.compile(rb'"0x[0-9a-fA-F]{1,16}"')
_COLON = re.compile(rb"[ \t\r\n]*:")
_FOLLOW = frozenset(b",}] \t\r\n")
_WS = b" \t\r\n"

_S = rb"[ \t\r\n]*"  # JSON's whitespace
_PAIR = rb'"[^"\\\n]*"' + _S + b":" + _S + rb'(?:"[^"\\\n]*"|[^ \t\r\n"{}\[\],:]+)'
_OBJECT = rb"\{" + _S + rb"(?:" + _PAIR + rb"(?:" + _S + b"," + _S + _PAIR + rb")*)?" + _S + rb"\}"
#: a flat line (depth 1) or block of lines (depth 2): objects of strings without escapes and of literals
_FLAT = {
    1: re.compile(_S + _OBJECT + _S),
    2: re.compile(
        _S + rb"\[" + _S + rb"(?:" + _OBJECT + rb"(?:" + _S + b"," + _S + _OBJECT + rb")*)?" + _S + rb"\]" + _S
    ),
}


@lru_cache(maxsize=8)
def _pair(keys: tuple[bytes, ...]) -> re.Pattern[bytes]:
    """A key of ``keys``, its colon and a hex value: in a flat document, only ever a key and its value."""
    names = b"|".join(re.escape(k) for k in keys)
    return re.compile(rb'("(?:' + names + rb')"' + _S + b":" + _S + rb')"0x([0-9a-fA-F]{1,16})"')


def unhex_py(data: bytes, depth: int, keys: tuple[bytes, ...]) -> bytes:
    """:mod:`kvmpfn.trace._unhex`'s ``unhex`` in Python (module docstring)."""
    flat = _FLAT.get(depth)
    if keys and flat is not None and flat.fullmatch(data):
        parts = _pair(keys).split(data)  # text, key and colon, hex digits, text, ...
        parts[2::3] = [b"%d" % int(digits, 16) for digits in parts[2::3]]
        return b"".join(parts)
    return _lexed(data, depth, keys)


def _lexed(data: bytes, depth: int, keys: tuple[bytes, ...]) -> bytes:
    """:func:`unhex_py` for any bytes: strings lexed as JSON lexes them."""
    out: list[bytes] = []
    n = len(data)
    i = level = prev = 0
    key: bytes | None = None  # the last string followed by ':'
    while i < n:
        j = data.find(b'"', i)
        if j < 0:
            j = n
        between = data[i:j]
        level += between.count(b"{") + between.count(b"[") - between.count(b"}") - between.count(b"]")
        stripped = between.rstrip(_WS)
        if stripped:
            prev = stripped[-1]
        out.append(between)
        if j == n:
            break
        end = _STRING_BODY.match(data, j + 1).end()  # type: ignore[union-attr]  # matches the empty string
        if end < n and data[end] == 34:
            end += 1
        if (
            prev == 58  # ":"
            and level == depth
            and key in keys
            and _HEX.fullmatch(data, j, end)
            and (end == n or data[end] in _FOLLOW)
        ):
            out.append(b"%d" % int(data[j + 3 : end - 1], 16))
            prev = 48
            i = end
            continue
        out.append(data[j:end])
        if end - j >= 2 and data[end - 1] == 34 and _COLON.match(data, end):
            key = data[j + 1 : end - 1]
        prev = 34
        i = end
    return b"".join(out)


unhex: Callable[[bytes, int, tuple[bytes, ...]], bytes] = unhex_py
if native.STALE is None:  # built and unchanged since, whether or not KVMPFN_PURE asks for the Python sources
    try:
        from kvmpfn.trace._unhex import unhex as unhex_c

        unhex = unhex_c
    except ImportError:  # installed without compiling (KVMPFN_PURE_PYTHON=1), or a source tree
        pass
