"""No key twice in any JSON object the model writes.

A grammar cannot say "a key this object has not had yet" (the keys of a free object are any
strings), so the sampler does: it follows the JSON written so far, and before each token bans
the tokens that would close a key the open object already has. Keys are written without
escapes (grammar.py's keychar), so a key's bytes are what a JSON parser reads.

Only tokens with a quote can close a key, so the vocabulary is indexed once by what lies before
a token's first quote and between its quotes; a token that could repeat a key is then checked by
running its bytes through a copy of the state.
"""

from __future__ import annotations

import bisect
import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

BANNED = -1e30  # added to a logit: lower than any allowed token, yet finite (never all -inf)


@dataclass(frozen=True)
class KeyIndex:
    """A model's tokens with quotes, by the text around their quotes."""

    heads: dict[bytes, tuple[int, ...]]  # the bytes before the first quote -> tokens
    inner: dict[bytes, tuple[int, ...]]  # bytes between two quotes -> tokens
    twice: tuple[int, ...]  # tokens with the same bytes between quotes twice: "a":1,"a"
    pieces: dict[int, bytes]  # each such token's bytes
    max_key: int  # characters of a key at most (the grammar's MAX_KEY)
    vocabulary: Callable[[], list[bytes]]  # every token's bytes (read only for a key of max_key)

    @classmethod
    def build(cls, quoted: dict[int, bytes], max_key: int, vocabulary: Callable[[], list[bytes]]) -> KeyIndex:
        heads: dict[bytes, list[int]] = defaultdict(list)
        inner: dict[bytes, list[int]] = defaultdict(list)
        twice = []
        for token, piece in quoted.items():
            parts = piece.split(b'"')
            heads[parts[0]].append(token)
            between = parts[1:-1]
            for part in set(between):
                inner[part].append(token)
            if len(set(between)) < len(between):
                twice.append(token)
        return cls({k: tuple(v) for k, v in heads.items()}, {k: tuple(v) for k, v in inner.items()},
                   tuple(twice), quoted, max_key, vocabulary)

    @functools.cached_property
    def sorted_pieces(self) -> list[tuple[bytes, int]]:
        return sorted((piece, token) for token, piece in enumerate(self.vocabulary()))

    def starting_with(self, prefix: bytes) -> list[int]:
        pieces = self.sorted_pieces
        found = []
        i = bisect.bisect_left(pieces, (prefix, -1))
        while i < len(pieces) and pieces[i][0].startswith(prefix):
            found.append(pieces[i][1])
            i += 1
        return found


@dataclass
class _Object:
    keys: set[bytes] = field(default_factory=set)
    expect_key: bool = True  # after "{" or ","


class KeyTracker:
    """Follows one reply's JSON; `banned()` names the tokens that would repeat a key now."""

    def __init__(self, index: KeyIndex) -> None:
        self.index = index
        self.stack: list[_Object | None] = []  # None: an array
        self.in_string = False
        self.is_key = False
        self.escaped = False
        self.key = bytearray()  # the key being written

    def feed(self, piece: bytes) -> None:
        self._run(piece, self.stack)

    def _run(self, piece: bytes, stack: list[_Object | None]) -> bool:
        """Advance over `piece`; False as soon as it closes a key its object has (state then undefined)."""
        for byte in piece:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif byte == 0x5C:  # a backslash (in values: keys have none)
                    self.escaped = True
                elif byte == 0x22:
                    self.in_string = False
                    if self.is_key:
                        top = stack[-1]
                        assert top is not None
                        key = bytes(self.key)
                        if key in top.keys:
                            return False
                        top.keys.add(key)
                        top.expect_key = False
                elif self.is_key:
                    self.key.append(byte)
            elif byte == 0x22:
                self.in_string = True
                top = stack[-1] if stack else None
                self.is_key = top is not None and top.expect_key
                self.key.clear()
            elif byte == 0x7B:  # {
                stack.append(_Object())
            elif byte == 0x5B:  # [
                stack.append(None)
            elif byte in (0x7D, 0x5D):  # } ]
                if stack:
                    stack.pop()
            elif byte == 0x2C and stack and stack[-1] is not None:  # a comma between an object's pairs
                stack[-1].expect_key = True
        return True

    def _repeats(self, piece: bytes) -> bool:
        saved = (self.in_string, self.is_key, self.escaped, bytes(self.key))
        copy = [None if f is None else _Object(set(f.keys), f.expect_key) for f in self.stack]
        try:
            return not self._run(piece, copy)
        finally:
            self.in_string, self.is_key, self.escaped = saved[:3]
            self.key = bytearray(saved[3])

    def banned(self) -> set[int]:
        """Tokens that would close a key already in its object."""
        if not any(self.stack):
            return set()
        objects = [f for f in self.stack if f is not None and f.keys]
        index = self.index
        banned: set[int] = set()
        if self.in_string and self.is_key:
            top = self.stack[-1]
            assert top is not None
            written = bytes(self.key)
            for key in top.keys:
                if key.startswith(written):
                    rest = key[len(written):]
                    banned.update(index.heads.get(rest, ()))  # rest, then the closing quote
                    if len(key.decode("utf-8", "replace")) >= index.max_key:
                        banned.update(index.starting_with(rest))  # only its closing quote could follow
        candidates = {t for f in objects for k in f.keys for t in index.inner.get(k, ())}
        candidates.update(index.twice)
        banned.update(t for t in candidates - banned if self._repeats(index.pieces[t]))
        return banned

