"""Stream a trace (docs/trace-format.md): decompress, split lines, decode and validate each into a typed event.

>>> with open_trace("trace.jsonl") as reader:          # doctest: +SKIP
...     reader.header.mmu
...     for line_no, event in reader:
...         ...

Memory stays flat: the header is read as one line, the events after it in blocks of at most ``_BLOCK`` bytes
of whole lines (no line longer than ``MAX_LINE`` is accepted), and nothing is kept of a block once its events
are yielded. Every input error, from a missing file to a bad field, is one
:class:`TraceError` whose ``str`` is a single line ``PATH:LINE: CONTEXT: field "NAME": WHAT``.

Decoding has a fast path, msgspec's typed decoder built once. Integers may be JSON numbers or ``"0x..."``
strings: before a line or block with ``"0x`` is decoded, :func:`kvmpfn.trace.unhex.unhex` rewrites the hex
strings of integer fields as JSON numbers (in C when built), so both spellings cost about the same.
A block of lines is decoded by one call, as a JSON array (:meth:`TraceReader._blocks`); a block that does not
decode is decoded again line by line, so that errors name the same line and the events before it come first.
A line the fast path rejects is decoded again, as written, slowly: untyped, hex/decimal strings in integer
fields turned into ints, then ``msgspec.convert``; if that fails too, the error is rewritten to name the field
and the value.
"""

from __future__ import annotations

import gzip
import io
import re
import sys
from collections.abc import Iterator
from itertools import chain
from operator import length_hint
from typing import Any, BinaryIO, get_args

import msgspec
import zstandard
from msgspec import inspect as mi

from kvmpfn.errors import InputError
from kvmpfn.trace.events import (
    EVENT_TYPES,
    Backing,
    Event,
    FaultKind,
    FieldError,
    Header,
    KernelName,
    MmuKind,
    PagingMode,
    range_text,
)
from kvmpfn.trace.unhex import unhex

__all__ = ["MAX_LINE", "TraceError", "TraceReader", "open_trace"]

#: The longest line accepted, in bytes, without its newline.
MAX_LINE = 1 << 20

_BUFFER = 1 << 16
_BLOCK = 1 << 16  # bytes read at once after the header, decoded as one block of lines
_ZSTD_FEED = 512  # compressed bytes per decompression step: bounds the output of one step
_CONTROL = {c: f"\\x{c:02x}" for c in range(32)}


class TraceError(InputError):
    """An input error in a trace: exit status 2, one line naming file, line and field.

    :param path: the trace's path as the caller gave it (``<stdin>`` for ``-``)
    :param line: the 1-based line in the decompressed file, or ``None`` for a file-level error
    :param message: what is wrong
    :param field: the field, dotted from the line's object (``guest.paging``, ``memslots[1].gfn``)
    :param context: ``header`` or ``event "pf"`` (or ``event`` when the op is unknown)
    """

    def __init__(
        self,
        path: str,
        line: int | None,
        message: str,
        *,
        field: str | None = None,
        context: str | None = None,
    ) -> None:
        Exception.__init__(self, path, line, message)
        self.path = path
        self.line = line
        self.message = message
        self.field = field
        self.context = context

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.path, self.line, self.message),
            {"field": self.field, "context": self.context},
        )

    def __str__(self) -> str:
        parts = [self.path if self.line is None else f"{self.path}:{self.line}"]
        if self.context:
            parts.append(self.context)
        if self.field:
            parts.append(f'field "{self.field}"')
        parts.append(self.message)
        return ": ".join(parts).translate(_CONTROL)


class _LineError(Exception):
    """A line that does not decode; the reader adds path and line number."""

    def __init__(self, message: str, field: str | None = None, context: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.context = context


# --- decoding one line -------------------------------------------------------------------------------------

_EVENT_DECODER = msgspec.json.Decoder(Event)
_HEADER_DECODER = msgspec.json.Decoder(Header)
_ANY_DECODER = msgspec.json.Decoder()
_INT = "int"
_AT_RE = re.compile(r" - at `\$([^`]*)`$")
_TOKEN_RE = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
#: a \u escape of a high surrogate not followed by a low one, or of a low one not preceded by a high one
_SURROGATE_RE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F]"
)
_OP_RE = re.compile(rb'"op"\s*:\s*"([a-z_]{1,16})"')
# msgspec.inspect sorts the values of a Literal; messages list them in the order of the format.
_LITERAL_ORDER = {frozenset(get_args(t)): get_args(t) for t in (PagingMode, Backing, MmuKind, KernelName, FaultKind)}


def _parse_int(text: str) -> int | None:
    """A hex (``0x7f001000``) or decimal (``4096``) string as an int; ``None`` if it is neither."""
    body = text[1:] if text[:1] == "-" else text
    base = 10
    if body[:2] in ("0x", "0X"):
        body, base = body[2:], 16
        ok = body.isascii() and body.isalnum()  # int() would also take "_", spaces and signs
    else:
        ok = body.isascii() and body.isdigit()
    if not ok:
        return None
    if len(body) > 24:  # out of range unless zero-padded; do not feed int() thousands of digits
        body = body.lstrip("0") or "0"
        if len(body) > 24:
            return -(1 << 80) if text[0] == "-" else 1 << 80
    try:
        value = int(body, base)
    except ValueError:  # a hex string with letters beyond f
        return None
    return -value if text[0] == "-" else value


def _members(t: mi.Type) -> tuple[mi.Type, ...]:
    return t.types if isinstance(t, mi.UnionType) else (t,)


def _is_flag(t: mi.Type) -> bool:
    return any(isinstance(m, mi.BoolType) for m in _members(t))


def _int_field(t: mi.Type) -> bool:
    """Whether a field is an integer field (a string there is a number); 0/1 flags are not."""
    if _is_flag(t):
        return False
    return any(
        isinstance(m, mi.IntType) or (isinstance(m, mi.LiteralType) and all(type(v) is int for v in m.values))
        for m in _members(t)
    )


def _build_specs(cls: type, specs: dict[type, dict[str, Any]]) -> None:
    """For each Struct reachable from ``cls``: field name -> ``_INT``, a Struct class, or ``[class]``."""
    if cls in specs:
        return
    spec: dict[str, Any] = {}
    specs[cls] = spec
    for f in mi.type_info(cls).fields:
        if _int_field(f.type):
            spec[f.encode_name] = _INT
            continue
        for m in _members(f.type):
            if isinstance(m, mi.StructType):
                spec[f.encode_name] = m.cls
                _build_specs(m.cls, specs)
            elif isinstance(m, mi.ListType) and isinstance(m.item_type, mi.StructType):
                spec[f.encode_name] = [m.item_type.cls]
                _build_specs(m.item_type.cls, specs)


_SPECS: dict[type, dict[str, Any]] = {}
for _cls in (Header, *EVENT_TYPES.values()):
    _build_specs(_cls, _SPECS)


def _normalize(obj: dict[str, Any], spec: dict[str, Any]) -> None:
    """Turn hex/decimal strings in integer fields of ``obj`` (in place, recursively) into ints."""
    for key, value in obj.items():
        kind = spec.get(key)
        if kind is None:
            continue
        if kind is _INT:
            if type(value) is str:
                number = _parse_int(value)
                if number is not None:
                    obj[key] = number
        elif type(kind) is list:
            if type(value) is list:
                for item in value:
                    if type(item) is dict:
                        _normalize(item, _SPECS[kind[0]])
        elif type(value) is dict:
            _normalize(value, _SPECS[kind])


def _unhex_keys() -> tuple[bytes, ...]:
    """The names of the events' integer fields (never the name of another kind of field in any event)."""
    is_int: dict[str, set[bool]] = {}
    for cls in EVENT_TYPES.values():
        for f in mi.type_info(cls).fields:
            is_int.setdefault(f.encode_name, set()).add(_SPECS[cls].get(f.encode_name) is _INT)
    return tuple(sorted(name.encode() for name, kinds in is_int.items() if kinds == {True}))


#: the field names whose ``"0x..."`` values :func:`unhex` rewrites as JSON numbers
_UNHEX_KEYS = _unhex_keys()
#: a block of event lines as one JSON array (:meth:`TraceReader._blocks`)
_BLOCK_DECODER = msgspec.json.Decoder(list[Event])


def _show(value: Any) -> str:
    """A value as JSON, shortened for a one-line message."""
    try:
        text = msgspec.json.encode(value).decode()
    except Exception:  # only for a message
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return _show(value)


def _malformed(data: bytes, exc: BaseException, context: str | None) -> _LineError:
    """Why a line is not JSON: NUL byte, invalid UTF-8, nesting, or msgspec's syntax message."""
    nul = data.find(b"\0")
    if nul >= 0:
        return _LineError(f"NUL byte at byte {nul}", context=context)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return _LineError(f"invalid UTF-8 at byte {e.start}", context=context)
    if data.startswith(b"\xef\xbb\xbf"):
        return _LineError("UTF-8 byte order mark (BOM) at the start of the line", context=context)
    if isinstance(exc, RecursionError):
        return _LineError("malformed JSON: nested too deeply", context=context)
    text = str(exc)
    if text.startswith("Input data was truncated") and _SURROGATE_RE.search(data):
        text = "a \\u escape is half of a UTF-16 surrogate pair"  # msgspec calls that "truncated" too
    elif text.startswith("Input data was truncated"):
        text = "the line ends inside a JSON value"
    elif text.startswith("JSON is malformed: "):
        text = text[len("JSON is malformed: ") :]
    return _LineError(f"malformed JSON: {text}", context=context)


def _tokens(path: str) -> list[str | int]:
    """``.memslots[1].gfn`` -> ``["memslots", 1, "gfn"]``."""
    return [name if name else int(index) for name, index in _TOKEN_RE.findall(path)]


def _field_name(tokens: list[str | int]) -> str | None:
    out = ""
    for tok in tokens:
        out += f"[{tok}]" if isinstance(tok, int) else (f".{tok}" if out else tok)
    return out or None


def _lookup(raw: Any, tokens: list[str | int]) -> tuple[bool, Any]:
    for tok in tokens:
        if isinstance(tok, int) and isinstance(raw, list) and tok < len(raw):
            raw = raw[tok]
        elif isinstance(tok, str) and isinstance(raw, dict) and tok in raw:
            raw = raw[tok]
        else:
            return False, None
    return True, raw


def _type_at(t: mi.Type, tokens: list[str | int]) -> mi.Type | None:
    for tok in tokens:
        nxt = None
        for m in _members(t):
            if isinstance(tok, str) and isinstance(m, mi.StructType):
                nxt = next((f.type for f in m.fields if f.encode_name == tok), None)
            elif isinstance(tok, int) and isinstance(m, mi.ListType):
                nxt = m.item_type
            if nxt is not None:
                break
        if nxt is None:
            return None
        t = nxt
    return t


def _expected(t: mi.Type, name: str, value: Any) -> str | None:
    """What field ``name`` of type ``t`` expects, as ``expected ..., got VALUE``; None if unknown."""
    members = [m for m in _members(t) if not isinstance(m, mi.NoneType)]
    got = f"got {_json_kind(value)}"
    if _is_flag(t):
        return f"expected 0 or 1 (or false/true), {got}"
    if len(members) != 1:
        return None
    m = members[0]
    if isinstance(m, mi.IntType):
        number = value if type(value) is int else _parse_int(value) if type(value) is str else None
        if number is None:
            return f"expected an integer, {got}"
        lo = m.ge if m.ge is not None else (m.gt + 1 if m.gt is not None else 0)
        limit = m.lt if m.lt is not None else (m.le + 1 if m.le is not None else 1 << 64)
        return f"expected {range_text(name, lo, limit)}, {got}"
    if isinstance(m, mi.LiteralType):
        if name == "kvmpfn" and (type(value) is int or (type(value) is str and _parse_int(value) is not None)):
            return f"unsupported trace format version {_show(value)} (this kvmpfn reads version 1)"
        values = _LITERAL_ORDER.get(frozenset(m.values), m.values)
        return f"expected one of {', '.join(_show(v) for v in values)}, {got}"
    if isinstance(m, mi.StrType):
        return f"expected a string, {got}"
    if isinstance(m, mi.StructType):
        return f"expected an object, {got}"
    if isinstance(m, mi.ListType):
        return f"expected an array, {got}"
    return None


def _explain(exc: msgspec.ValidationError, raw: Any, top: type | None, context: str) -> _LineError:
    """Rewrite msgspec's validation error as ``field "NAME": expected ..., got VALUE``."""
    text = str(exc)
    at = _AT_RE.search(text)
    tokens = _tokens(at.group(1)) if at else []
    base = text[: at.start()] if at else text
    cause = exc.__cause__
    if isinstance(cause, FieldError):
        tokens += _tokens("." + cause.field)
        message = cause.message
        found, value = _lookup(raw, tokens)
        if cause.expected is not None and found:
            message = f"expected {cause.expected}, got {_json_kind(value)}"
        return _LineError(message, _field_name(tokens), context)
    m = re.match(r"Object (contains unknown|missing required) field `(.*)`$", base)
    if m:
        tokens.append(m.group(2))
        if m.group(1) == "missing required":
            return _LineError("missing required field", _field_name(tokens), context)
        return _LineError('unknown field (free-form annotations go under "x")', _field_name(tokens), context)
    found, value = _lookup(raw, tokens)
    if not tokens:
        return _LineError(f"expected a JSON object, got {_json_kind(raw)}", None, context)
    if top is None or tokens == ["op"]:
        ops = ", ".join(EVENT_TYPES)
        what = f"unknown op {_show(value)}" if isinstance(value, str) else f"expected a string, got {_show(value)}"
        return _LineError(f"{what} (ops: {ops})", "op", context)
    t = _type_at(mi.type_info(top), tokens)
    message = _expected(t, str(tokens[-1]), value) if t is not None and found else None
    if message is None:
        message = base[:1].lower() + base[1:]
    return _LineError(message, _field_name(tokens), context)


def _out_of_range(data: bytes, fast: msgspec.ValidationError, header: bool) -> _LineError | None:
    """A JSON number too large for any decoder (over ~4300 digits, or a float beyond 1e308): msgspec says so
    only in the typed error, with the field's path."""
    text = str(fast)
    if not text.startswith(("Integer value out of range", "Number out of range")):
        return None
    at = _AT_RE.search(text)
    path = at.group(1).split("[...]")[0] if at else ""  # "[...]": inside a free-form dict ("x")
    context = "header"
    if not header:
        op = _OP_RE.search(data)
        context = f'event "{op.group(1).decode()}"' if op and op.group(1).decode() in EVENT_TYPES else "event"
    return _LineError("number out of range (integers must be below 2**64)", _field_name(_tokens(path)), context)


def _decode_slow(data: bytes, header: bool, fast: msgspec.ValidationError | None = None) -> Any:
    """Decode a line the fast decoder rejected (with ``fast``): integers from strings, else a precise error."""
    context = "header" if header else "event"
    try:
        raw = _ANY_DECODER.decode(data)
    except Exception as e:  # DecodeError, UnicodeDecodeError, RecursionError, ...
        big = _out_of_range(data, fast, header) if fast is not None else None
        raise big or _malformed(data, e, context if header else None) from None
    top: type | None = Header
    if isinstance(raw, dict) and not header:
        op = raw.get("op")
        top = EVENT_TYPES.get(op) if isinstance(op, str) else None
        if top is not None:
            context = f'event "{op}"'
    if isinstance(raw, dict) and top is not None:
        if header and "kvmpfn" not in raw:
            got = "an event" if "op" in raw else "an object without it"
            raise _LineError(
                f'missing (the first line that is not blank or a comment is the header {{"kvmpfn": 1, ...}}; '
                f"this one is {got})",
                "kvmpfn",
                context,
            )
        _normalize(raw, _SPECS[top])
    try:
        # convert() to a concrete class: converting to the Event union rebuilds its decoder each call
        return msgspec.convert(raw, top or Event)
    except msgspec.ValidationError as e:
        original = _ANY_DECODER.decode(data)
        raise _explain(e, original, top, context) from None
    except Exception as e:  # never let a traceback escape
        raise _LineError(f"cannot decode: {type(e).__name__}: {e}", None, context) from None


def _decode_line(data: bytes, header: bool = False) -> Any:
    """Decode one line (bytes of a JSON object) into an event, or into a :class:`Header`.

    :raises _LineError: (internal) the reader and writer turn it into their own errors
    """
    if not header and data.find(b'"0x') >= 0:  # faster than `in`
        try:
            return _EVENT_DECODER.decode(unhex(data, 1, _UNHEX_KEYS))
        except Exception:  # , S110 - decoding the line as written says what is wrong
            pass
    try:
        return (_HEADER_DECODER if header else _EVENT_DECODER).decode(data)
    except msgspec.ValidationError as e:
        return _decode_slow(data, header, e)
    except Exception as e:  # DecodeError, UnicodeDecodeError, RecursionError, ...
        raise _malformed(data, e, "header" if header else None) from None


# --- the byte stream -------------------------------------------------------------------------------------


class _ZstdRaw(io.RawIOBase):
    """The decompressed bytes of a stream of zstd frames; ``EOFError`` when the input ends inside a frame.

    zstandard's ``stream_reader`` ends a truncated stream silently, so frames are decoded with
    ``decompressobj``, fed ``_ZSTD_FEED`` bytes at a time so that one step's output stays bounded.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj: Any = None
        self._pending = b""
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            if not self._step():
                return 0
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _step(self) -> bool:
        data, self._pending = (self._pending or self._fh.read(_ZSTD_FEED)), b""
        if not data:
            if self._dobj is not None:
                raise EOFError("zstd stream truncated")
            return False
        if self._dobj is None:
            self._dobj = self._dctx.decompressobj()
        if len(data) > _ZSTD_FEED:
            data, self._pending = data[:_ZSTD_FEED], data[_ZSTD_FEED:]
        self._out = memoryview(self._dobj.decompress(data))
        if self._dobj.eof:
            self._pending = self._dobj.unused_data + self._pending
            self._dobj = None
        return True


def _open_error(path: str, exc: OSError) -> TraceError:
    if isinstance(exc, FileNotFoundError):
        what = "no such file"
    elif isinstance(exc, IsADirectoryError):
        what = "is a directory"
    elif isinstance(exc, PermissionError):
        what = "permission denied"
    else:
        what = (exc.strerror or str(exc)).lower()
    return TraceError(path, None, what)


def _stream_error(path: str, line: int, exc: BaseException) -> TraceError:
    """A decompression or read error while reading ``line``."""
    text = str(exc)
    if path.lower().endswith(".gz"):
        if text.startswith("Not a gzipped file"):
            what = "not a gzip file"
        elif isinstance(exc, EOFError):
            what = "gzip stream truncated"
        else:
            what = f"corrupt gzip stream: {text}"
    elif isinstance(exc, zstandard.ZstdError):
        if "Unknown frame descriptor" in text and line == 1:
            what = "not a zstd file"
        else:
            what = f"corrupt zstd stream: {text.removeprefix('zstd decompress error: ')}"
    elif isinstance(exc, EOFError):
        what = text or "stream truncated"
    elif isinstance(exc, OSError):
        what = f"read error: {(exc.strerror or text).lower()}"
    else:
        what = f"read error: {type(exc).__name__}: {text}"
    return TraceError(path, line, what)


class TraceReader:
    """An open trace: ``header`` is decoded; iterating yields ``(line_no, event)`` for the remaining lines.

    A context manager; iterate it once (it is a stream).
    """

    def __init__(self, path: str, stream: BinaryIO, owned: list[BinaryIO]) -> None:
        self.path = path
        self._stream = stream
        self._owned = owned
        self._line_no = 0
        self._range: Iterator[int] | None = None
        self._range_end = 0
        self.header_line = 0
        self.header: Header = self._read_header()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the files this reader opened (never standard input)."""
        for f in reversed(self._owned):
            f.close()
        self._owned = []

    @property
    def line_no(self) -> int:
        """The number of the last line read: of the last event yielded, while iterating."""
        if self._range is not None:  # a decoded block: the line of the item its iterator gave last
            return self._range_end - length_hint(self._range)
        return self._line_no

    def _error(self, line: int, exc: _LineError) -> TraceError:
        return TraceError(self.path, line, exc.message, field=exc.field, context=exc.context)

    def _readline(self) -> bytes:
        """The next line (empty at the end), or TraceError."""
        try:
            data = self._stream.readline(MAX_LINE + 2)
        except Exception as e:  # gzip/zlib/zstd/OS errors all become input errors
            raise _stream_error(self.path, self._line_no + 1, e) from None
        if data:
            self._line_no += 1
            if len(data) > MAX_LINE and len(data) - data.endswith(b"\n") > MAX_LINE:
                raise TraceError(self.path, self._line_no, f"line too long (over {MAX_LINE} bytes)")
        return data

    def _check_comment(self, data: bytes) -> None:
        """A blank or comment line must still be UTF-8 without NUL bytes."""
        if b"\0" in data:
            raise TraceError(self.path, self._line_no, f"NUL byte at byte {data.find(0)}")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TraceError(self.path, self._line_no, f"invalid UTF-8 at byte {e.start}") from None

    def _read_header(self) -> Header:
        while True:
            data = self._readline()
            if not data:
                raise TraceError(self.path, None, "no header: no line that is not blank or a comment")
            stripped = data.lstrip()
            if not stripped or stripped[:1] == b"#":
                self._check_comment(data)
                continue
            self.header_line = self._line_no
            try:
                return _decode_line(data, header=True)
            except _LineError as e:
                raise self._error(self._line_no, e) from None

    def __iter__(self) -> Iterator[tuple[int, Event]]:
        return chain.from_iterable(self._blocks())

    def _blocks(self) -> Iterator[Iterator[tuple[int, Event]]]:
        """The events after the header, as iterators of ``(line_no, event)``, one per block of whole lines.

        A block is what one ``read1`` returned (at most :data:`_BLOCK` bytes; a pipe gives what it has), from
        the end of the line the previous block left unfinished to the last newline. Its lines joined by
        commas into one JSON array decode in one call: every newline becomes ``,\\n``, so a blank or comment
        line, a line with two values or without a whole one, cannot make a valid array, and when it decodes,
        its items are the lines in order. Anything else (the array does not decode, or a line is longer than
        :data:`MAX_LINE`) is decoded again line by line (:meth:`_lines`), which yields every event before the
        bad line and names it exactly as a reader of one line at a time would.
        """
        read = getattr(self._stream, "read1", self._stream.read)
        line_no = self._line_no
        pending = b""  # the start of a line whose newline is not read yet
        while True:
            self._range = None
            self._line_no = line_no
            try:
                chunk = read(_BLOCK)
            except Exception as e:  # gzip/zlib/zstd/OS errors all become input errors
                raise _stream_error(self.path, line_no + 1, e) from None
            if not chunk:
                if pending:  # the last line, without a newline
                    yield self._lines(pending, line_no)
                    self._line_no = line_no + 1
                return
            marked = chunk.replace(b"\n", b",\n")
            lines = len(marked) - len(chunk)
            if not lines:
                pending += chunk
                if len(pending) > MAX_LINE:
                    raise TraceError(self.path, line_no + 1, f"line too long (over {MAX_LINE} bytes)")
                continue
            cut = chunk.rfind(b"\n") + 1
            first = line_no + 1
            line_no += lines
            events = None
            if len(pending) + cut <= MAX_LINE:
                array = b"".join((b"[", pending, memoryview(marked)[: cut + lines - 2], b"]"))
                if array.find(b'"0x') >= 0:
                    array = unhex(array, 2, _UNHEX_KEYS)
                try:
                    events = _BLOCK_DECODER.decode(array)
                except Exception:  # , S110 - decoding line by line says what is wrong
                    pass
            if events is not None and len(events) == lines:
                self._range = numbers = iter(range(first, line_no + 1))
                self._range_end = line_no
                yield zip(numbers, events, strict=True)
            else:
                yield self._lines(pending + chunk[:cut], first - 1)
            pending = chunk[cut:]

    def _lines(self, data: bytes, line_no: int) -> Iterator[tuple[int, Event]]:
        """Decode ``data`` (whole lines, the first after line ``line_no``) one line at a time."""
        for raw in io.BytesIO(data):
            line_no += 1
            self._line_no = line_no
            if len(raw) > MAX_LINE and len(raw) - raw.endswith(b"\n") > MAX_LINE:
                raise TraceError(self.path, line_no, f"line too long (over {MAX_LINE} bytes)")
            if raw[0] != 123:  # not "{"
                stripped = raw.lstrip()
                if not stripped or stripped[:1] == b"#":
                    self._check_comment(raw)
                    continue
            try:
                event = _decode_line(raw)
            except _LineError as e:
                raise self._error(line_no, e) from None
            yield line_no, event


def open_trace(path: str) -> TraceReader:
    """Open a trace and decode its header.

    ``-`` reads standard input (plain); ``.gz`` is gzip, ``.zst`` zstd, anything else plain.

    :raises TraceError: the file cannot be opened or read, or its header is missing or invalid
    """
    if path == "-":
        return TraceReader("<stdin>", sys.stdin.buffer, [])
    try:
        fh: BinaryIO = open(path, "rb", buffering=_BUFFER)  # owned by the reader
    except OSError as e:
        raise _open_error(path, e) from None
    owned: list[BinaryIO] = [fh]
    try:
        lower = path.lower()
        stream: BinaryIO = fh
        if lower.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=fh, mode="rb")
            owned.append(stream)
        elif lower.endswith(".zst"):
            stream = io.BufferedReader(_ZstdRaw(fh), _BUFFER)
            owned.append(stream)
        return TraceReader(path, stream, owned)
    except BaseException:
        for f in reversed(owned):
            f.close()
        raise
