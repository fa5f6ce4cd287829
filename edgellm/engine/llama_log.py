"""llama.cpp's log, routed into Python's logging in whole lines of bounded length and number.

llama.cpp calls back once per message, and a message may be part of a line: a continuation
(ggml level 5, e.g. the dots of a load's progress) goes on the line before it at that line's
level, and a line is passed on at its newline, or when the thread's next message starts. Its
lines can carry what a request or a model file put there (metadata, templates, grammars), so
each is cut to MAX_LINE bytes, and all of them together pass a token bucket: BURST at once,
RATE a second after that. What the bucket stops is counted, and said in one line when lines
pass again. Error lines are also kept per thread for llama_errors(), unlimited by the bucket.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp.llama_cpp as C

MAX_LINE = 1024  # bytes of one line; the rest is cut, and how much is said
BURST = 200  # lines that may pass at once: a model load logs ~180 at debug
RATE = 20.0  # lines a second once a burst is spent
MAX_ERRORS = 32  # error lines that llama_errors() keeps

log = logging.getLogger("edgellm.llama")

# ggml log levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line.
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_CONTINUATION = 5


class _Bucket:
    """A token bucket shared by all threads: whether a line may be logged now."""

    def __init__(self, burst: int, rate: float) -> None:
        self._burst, self._rate = burst, rate
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._stopped = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """None when the line must be dropped; else how many were dropped since the last one passed."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._tokens < 1:
                self._stopped += 1
                return None
            self._tokens -= 1
            stopped, self._stopped = self._stopped, 0
            return stopped


class _Line(threading.local):
    """The line a thread's messages are building, its first MAX_LINE bytes kept."""

    def __init__(self) -> None:
        self.level = logging.DEBUG
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, text: bytes) -> None:
        room = MAX_LINE - self.size
        if room > 0:
            self.parts.append(text[:room])
        self.size += len(text)

    def take(self) -> str | None:
        """The line so far as text (None if empty), and a new one started."""
        if not self.size:
            return None
        line = b"".join(self.parts).decode("utf-8", "replace").rstrip("\r")
        if self.size > MAX_LINE:
            line += f" … [{self.size - MAX_LINE} more bytes cut]"
        self.parts, self.size = [], 0
        return line


_bucket = _Bucket(BURST, RATE)
_line = _Line()
_errors = threading.local()  # llama.cpp's error lines during llama_errors() on this thread


@C.llama_log_callback
def on_llama_log(level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
    if level != _CONTINUATION:
        flush()  # a new message: the line before it ends here, newline or not
        # llama.cpp is chatty while loading: its info lines are our debug lines.
        _line.level = _LEVELS.get(level, logging.DEBUG)
    rest = text or b""
    while rest:
        head, newline, rest = rest.partition(b"\n")
        _line.add(head)
        if newline:
            flush()


def flush() -> None:
    """Pass on this thread's unfinished line, if any."""
    level, line = _line.level, _line.take()
    if line is None:
        return
    if level == logging.ERROR and hasattr(_errors, "lines") and len(_errors.lines) < MAX_ERRORS:
        _errors.lines.append(line)
    if log.isEnabledFor(level):
        stopped = _bucket.take()
        if stopped:
            log.warning("… %d llama.cpp log lines suppressed", stopped)
        if stopped is not None:
            log.log(level, "%s", line)


@contextmanager
def llama_errors() -> Iterator[list[str]]:
    """The error lines llama.cpp logs on this thread meanwhile: the reason a load or a context
    creation failed, which its API reports only as NULL."""
    _errors.lines = []
    try:
        yield _errors.lines
    finally:
        flush()  # an error may end without a newline: it belongs to this call
        del _errors.lines


def reason(lines: list[str], default: str) -> str:
    """The first error line without llama.cpp's function-name prefix."""
    return lines[0].split(": ", 1)[-1] if lines else default
