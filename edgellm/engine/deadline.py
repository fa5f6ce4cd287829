"""A bound on the work one request makes a worker thread do before the runner sees it.

A chat template is code from a model file and a JSON schema is code from a client: either
can ask for minutes of CPU (nested loops, exponential grammars). Python cannot stop a
thread, so the work checks in: the template's sandbox and the grammar compiler call
check() often, and it raises once the time is up (a 400 naming the limit) or once the
client has gone (then nobody reads the result).
"""

from __future__ import annotations

import threading
import time

from edgellm.errors import InvalidRequest

PREPARE_SECONDS = 5.0  # for the template, tokenizing and the grammar of one request together


class TooComplex(InvalidRequest):
    """The request's template or schema needs more work than one request may take."""

    code = "request_too_complex"


class Abandoned(Exception):
    """The client left while its request was being prepared; the work stops here."""


class Deadline:
    def __init__(self, seconds: float = PREPARE_SECONDS) -> None:
        self.seconds = seconds
        self._at = time.monotonic() + seconds
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The client has gone: the next check() stops the work."""
        self._cancelled.set()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise Abandoned()
        if time.monotonic() > self._at:
            raise TooComplex(f"preparing this request (its chat template, prompt and JSON schema) took more "
                             f"than {self.seconds:g} s, the limit for one request")
