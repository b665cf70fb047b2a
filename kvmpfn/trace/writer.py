"""Write traces (docs/trace-format.md): compact JSON Lines, compressed by extension, deterministic bytes.

>>> with TraceWriter("big.jsonl.zst") as w:            # doctest: +SKIP
...     w.write_header(Header(kvmpfn=1, mmu="tdp"))
...     w.write_event(Access(addr=0x7F001000, write=True, user=True, fetch=False))

Fields equal to their defaults are left out; addresses, frame numbers and values are hex strings (``addr``,
``gpa``, ``val``, ``err``, ``gfn``; in the header ``guest.cr3``, ``memslots[].gfn``, ``host.first_pfn``),
the other integers JSON numbers; flags ``true``/``false``, keys of ``t``/``x`` objects sorted. Each record is
checked by decoding it as the reader does (``validate=False`` skips that), so what the writer writes the
reader reads back, to an equal object.
"""

from __future__ import annotations

import gzip
import io
import re
import sys
from typing import Any, BinaryIO

import msgspec
import zstandard

from kvmpfn.outputs import AtomicFile
from kvmpfn.trace.events import Event, Header
from kvmpfn.trace.reader import _decode_line, _LineError

__all__ = ["TraceWriter"]

_BUFFER = 1 << 16
_DEFAULT_HEADER = Header(kvmpfn=1)
_PLAIN_ENCODER = msgspec.json.Encoder()
#: an event's hex fields as the compact encoder writes them (before "t" and "x", which hold free-form values)
_HEX_FIELD = re.compile(rb'(?<=[{,])"(addr|gpa|val|err|gfn)":(\d+)')
_FREE_FORM = (b',"t":', b',"x":')


def _hex_field(m: re.Match) -> bytes:
    return b'"%s":"0x%x"' % (m[1], int(m[2]))


def hex_event_line(data: bytes) -> bytes:
    """An encoded event with its hex fields (see the module docstring) as ``"0x..."`` strings."""
    end = len(data)
    for marker in _FREE_FORM:
        i = data.find(marker, 0, end)
        if i >= 0:
            end = i
    return _HEX_FIELD.sub(_hex_field, data[:end]) + data[end:]


class TraceWriter:
    """Write a trace to ``path``: ``-`` is standard output; ``.gz`` gzip, ``.zst`` zstd, else plain.

    A context manager. Write the header first; comments may go anywhere.

    :param validate: decode every record before writing it and raise ``ValueError`` if the reader would
        reject it
    """

    def __init__(self, path: str, *, validate: bool = True) -> None:
        self.path = path
        self._validate = validate
        self._encoder = msgspec.json.Encoder(order="deterministic")
        self._header_written = False
        self._owned: list[Any] = []
        self._atomic: AtomicFile | None = None
        if path == "-":
            self._out: BinaryIO = sys.stdout.buffer
            return
        self._atomic = AtomicFile(path)  # the trace appears at ``path`` only when complete
        fh = io.BufferedWriter(self._atomic, buffer_size=_BUFFER)
        self._owned.append(fh)
        lower = path.lower()
        if lower.endswith(".gz"):
            # No file name and mtime 0 in the gzip header: the same trace gives the same bytes.
            self._out = gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=fh, mtime=0)
            self._owned.append(self._out)
        elif lower.endswith(".zst"):
            cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
            self._out = cctx.stream_writer(fh, closefd=False)
            self._owned.append(self._out)
        else:
            self._out = fh

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        elif self._atomic is not None:
            self._atomic.discard()

    def close(self) -> None:
        """Finish the compressed stream and close the file (standard output is only flushed)."""
        if not self._owned:
            if self.path == "-":
                self._out.flush()
            return
        for f in reversed(self._owned):
            f.close()
        self._owned = []
        if self._atomic is not None:
            self._atomic.commit()

    def _checked(self, obj: Any, header: bool) -> tuple[Any, bytes]:
        """``obj`` and its encoding, as the reader would decode them (the canonical form)."""
        data = self._encoder.encode(obj)
        if not self._validate:
            return obj, data
        try:
            decoded = _decode_line(data, header=header)
        except _LineError as e:
            where = f"{e.context}: " if e.context else ""
            field = f'field "{e.field}": ' if e.field else ""
            raise ValueError(f"invalid {'header' if header else 'event'}: {where}{field}{e.message}") from None
        if decoded != obj:  # e.g. a flag given as 1 or an integer as a string: write the canonical form
            return decoded, self._encoder.encode(decoded)
        return obj, data

    def write_header(self, header: Header) -> None:
        """Write the header line; fields equal to the defaults are left out."""
        if self._header_written:
            raise ValueError("the header is already written")
        if not isinstance(header, Header):
            raise TypeError(f"expected a Header, got {type(header).__name__}")
        header, data = self._checked(header, header=True)
        # omit_defaults leaves out plain defaults; the Struct- and list-valued ones are dropped here. Decoding
        # keeps the field order (and the sorted keys inside "x"), so a plain encoder gives stable bytes.
        fields = msgspec.json.decode(data)
        for name in ("guest", "memslots", "host"):
            if getattr(header, name) == getattr(_DEFAULT_HEADER, name):
                fields.pop(name, None)
        for obj, name in (
            (fields.get("guest"), "cr3"),
            (fields.get("host"), "first_pfn"),
            *((slot, "gfn") for slot in fields.get("memslots", ())),
        ):
            if obj is not None and type(obj.get(name)) is int:
                obj[name] = f"{obj[name]:#x}"
        self._out.write(_PLAIN_ENCODER.encode(fields) + b"\n")
        self._header_written = True

    def write_event(self, event: Event) -> None:
        """Write one event line."""
        if not self._header_written:
            raise ValueError("write_header() must come before the first event")
        self._out.write(hex_event_line(self._checked(event, header=False)[1]) + b"\n")

    def comment(self, text: str) -> None:
        """Write ``text`` as comment lines (``# text``), one per line of ``text``."""
        for line in text.split("\n") if text else [""]:
            self._out.write(b"#" + (b" " + line.encode() if line else b"") + b"\n")
