"""Admission before work: what a request may cost is bounded before anything costs memory or CPU in proportion
to it.

- `longest_json_array`: how many elements the longest array at the top of a JSON object's values holds, counted
  from the raw bytes and stopping once past a limit. Parsing a body of a million empty items builds a million
  objects (and validating them a million errors) before any limit is checked: a 3 MB body froze the event loop for
  32 s. Counting stops after `limit + 1` elements, so refusing it costs what its first items cost.
- `TokenizingBudget`: characters admitted to tokenizing and not yet scored, with a share per client, so that a
  flood is answered `overloaded` at once and other clients' small requests find room (service.py).
- `MemoryTrimmer`: after a large request, the memory its parsing freed is handed back to the system (glibc keeps
  freed arenas: 533 MB grew to 2 GB after two large requests and stayed, which a container memory limit counts).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import re
import time
from dataclasses import dataclass, field

# A JSON value's lexemes, as far as nesting goes: a string (escapes included), a bracket, or a run of anything else
# (numbers, commas, colons, spaces, literals) taken whole, so a long array of numbers is one match, not thousands.
_LEXEMES = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|[^"\[\]{}]+', re.DOTALL)
PARSE_FREELY = 48  # a body of fewer values than this per allowed item is parsed without counting (< 40 ms)


def longest_json_array(body: bytes, limit: int) -> tuple[str, int] | None:
    """The key of the first top-level array found to hold more than `limit` elements, and how many it holds at
    least (limit + 1: counting stops there); None when every top-level array holds `limit` or fewer, or when the
    body has so few values that parsing it costs little (the validator's length check then refuses it).

    `{"items": [{}, {}, {}]}` with limit 2 -> ("items", 3). Malformed JSON is not judged here (the parser's error
    comes later); only the count is, on the bytes as they stand."""
    if body.count(b"{") + body.count(b'"') // 2 <= PARSE_FREELY * (limit + 1):
        return None  # few enough objects and strings that parsing them all costs little (the validator then refuses
        # a list that is too long); an array of bare numbers, however long, the parser reads in Rust at little cost
    depth, key, counts, last_string = 0, None, {}, b""  # key: the array being counted at depth 2 (None: none)
    for match in _LEXEMES.finditer(body):
        lexeme = match.group()
        first = lexeme[:1]
        if first in b"]}":
            depth -= 1
            if depth < 2:
                key = None
            continue
        opens = first in b"[{"
        if depth == 2 and key is not None:
            if first == b'"' or opens:
                counts[key] = max(counts[key], 1)  # an array's first element (the rest follow commas)
            elif counts[key] == 0 and lexeme.strip(b" \t\r\n,"):
                counts[key] = 1  # a bare scalar opens the array
            if not (first == b'"' or opens):
                counts[key] += lexeme.count(b",")
                if counts[key] > limit:
                    return key, counts[key]
        if opens:
            depth += 1
            if depth == 2 and first == b"[":
                key = last_string[1:-1].decode("utf-8", "replace")[:100]
                counts[key] = 0
        elif first == b'"' and depth == 1:
            last_string = lexeme
    over = [(k, n) for k, n in counts.items() if n > limit]
    return over[0] if over else None


def count_protobuf_field(raw: bytes, field_number: int, limit: int) -> int:
    """How many times a top-level length-delimited field occurs in a serialized protobuf message, counting stops
    past `limit` (a repeated field's elements, without parsing them: a 16 MB message of empty items would otherwise
    become millions of objects before the item limit is read). A message malformed at this level counts what it
    could; its parse then fails with the proper error."""
    count, position, end = 0, 0, len(raw)
    while position < end and count <= limit:
        tag, position = _varint(raw, position)
        if tag is None:
            break
        wire_type = tag & 7
        if wire_type == 2:
            length, position = _varint(raw, position)
            if length is None:
                break
            position += length
            count += (tag >> 3) == field_number
        elif wire_type == 0:
            _, position = _varint(raw, position)
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            break  # groups (deprecated) and garbage: let the parser judge
    return count


def _varint(raw: bytes, position: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while position < len(raw) and shift < 64:
        byte = raw[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return None, position


@dataclass
class TokenizingBudget:
    """Characters admitted and not yet done (tokenized, queued, scored), in all and per client (a connection), so
    that a flood is refused at once, before it is tokenized, while other clients' small requests find room."""

    capacity: int
    admitted: int = 0
    by_client: dict[str, int] = field(default_factory=dict)

    def try_admit(self, client: str, characters: int) -> bool:
        """Admits and counts the request, or says no. It fits if the budget has room and its client stays within
        its share (half the budget while others hold some); a client holding nothing may send a small request
        (up to 1/64 of the budget) into a reserve of a quarter more; an idle server takes any one request."""
        characters = max(1, characters)
        mine = self.by_client.get(client, 0)
        share = self.capacity // 2 if self.admitted > mine else self.capacity
        fits = self.admitted + characters <= self.capacity and mine + characters <= share
        newcomer = mine == 0 and characters <= self.capacity // 64 and \
            self.admitted + characters <= self.capacity + self.capacity // 4
        if not (fits or newcomer or self.admitted == 0):
            return False
        self.admitted += characters
        self.by_client[client] = mine + characters
        return True

    def release(self, client: str, characters: int) -> None:
        characters = max(1, characters)
        self.admitted -= characters
        left = self.by_client.get(client, 0) - characters
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)


LARGE_REQUEST_BYTES = 1 << 20


class MemoryTrimmer:
    """glibc's malloc_trim(0) after a large request, at most once a second (it takes milliseconds); nothing where
    the C library has no such call."""

    def __init__(self, every_seconds: float = 1.0):
        library = ctypes.util.find_library("c")
        self._trim = getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
        self.every_seconds = every_seconds
        self._last = 0.0

    def due(self, size: int) -> bool:
        """Whether a request of `size` bytes is worth a trim now."""
        return self._trim is not None and size >= LARGE_REQUEST_BYTES and \
            time.monotonic() - self._last >= self.every_seconds

    def trim(self) -> None:
        self._last = time.monotonic()
        self._trim(0)
