"""Incremental detokenizing: token bytes in, safe-to-send text out.

Each generated token adds a few bytes. Two things must not reach a client
early: half of a multi-byte UTF-8 character (a token may end mid-character),
and text that could be the start of a stop string (the next token may
complete it, and a stop string never appears in the output).
"""

from __future__ import annotations

from collections.abc import Sequence

# Sequence length by the lead byte's high nibble, as llama.cpp's grammar engine reads UTF-8
# (0: a continuation byte, which cannot start a character).
_LENGTH = (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 3, 4)


class Utf8Decoder:
    """Incremental UTF-8 decoding where each malformed sequence becomes exactly one U+FFFD.

    Python's decoder replaces some malformed sequences (overlong forms,
    surrogates) byte by byte. llama.cpp's grammar counts such a sequence as
    one character, so a string constrained to n characters must decode to n
    characters: sequences are delimited here the way the grammar delimits them.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def decode(self, data: bytes, final: bool = False) -> str:
        if not self._buf:
            try:
                return data.decode("utf-8")  # the common case: whole characters
            except UnicodeDecodeError:
                pass
        buf = self._buf
        buf += data
        out = []
        i = 0
        while i < len(buf):
            n = _LENGTH[buf[i] >> 4]
            end = i + 1
            while end < len(buf) and end < i + n and buf[end] >> 6 == 2:
                end += 1
            if n > 1 and end == len(buf) and end - i < n and not final:
                break  # the rest of this character is in the next token
            if end - i == max(n, 1):
                try:
                    out.append(bytes(buf[i:end]).decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd")
            else:
                out.append("\ufffd")
            i = end
        del buf[:i]
        return "".join(out)


class TextAssembler:
    """Feed token bytes, get back the text that can be emitted now."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._stops = tuple(s for s in stops if s)
        self._decoder = Utf8Decoder()
        self._pending = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; return text that is now final.

        When a stop string is found, `stopped` is set and only the text before
        it is returned; everything from the stop string on is dropped.
        """
        self._pending += self._decoder.decode(data)
        if not self._stops:
            text, self._pending = self._pending, ""
            return text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self._pending = self._pending[:cut], ""
            self.stopped = True
            return text
        keep = self._held_back()
        text = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(text):]
        return text

    def finish(self) -> str:
        """Text still held back when generation ends without a stop string."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return text

    def _held_back(self) -> int:
        """Length of the longest tail of pending text that begins some stop string."""
        pending = self._pending
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
