"""llama.cpp's log in Python's logging: whole lines, each cut to MAX_LINE bytes, and at most a burst of
them at once, then a few a second, with one line saying how many were left out. A request once made
llama.cpp log a 42 MB line."""

from __future__ import annotations

import logging
import re
import time

import llama_cpp.llama_cpp as C
import pytest
from conftest import wait_until
from tiny_models import write_model

from edgellm.engine import llama_log
from edgellm.engine.llama_log import BURST, MAX_LINE, RATE, llama_errors, reason
from edgellm.engine.model import Model

LEFT_RECURSIVE = b'root ::= root "a"\n'  # llama.cpp refuses it with one error line through the log


@pytest.fixture
def lines(caplog, monkeypatch):
    """What edgellm.llama logs meanwhile, at every level, from a full bucket (it is process-wide)."""
    monkeypatch.setattr(llama_log, "_bucket", llama_log._Bucket(BURST, RATE))
    caplog.set_level(logging.DEBUG, logger="edgellm.llama")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "edgellm.llama"]


@pytest.fixture(scope="module")
def model(models):
    m = Model(models["random"])
    yield m
    m.close()


def test_a_long_line_is_cut_and_continuations_make_one_line(tmp_path, lines):
    Model(write_model(tmp_path / "long-name.gguf", name="x" * 100_000)).close()  # llama.cpp logs the name whole
    logged = lines()
    assert max(map(len, logged)) <= MAX_LINE + 40
    assert any("x" * 500 in line and line.endswith("more bytes cut]") for line in logged)
    # A load's progress comes as one dot per message, each a continuation of the line before.
    assert not any(line == "." for line in logged)
    assert any(re.fullmatch(r"\.{5,}", line) for line in logged)


def test_a_flood_of_lines_is_cut_short_and_counted(model, lines):
    def passed() -> int:
        return sum("left recursion" in line for line in lines())

    sent = 3 * BURST
    start = time.monotonic()
    for _ in range(sent):
        assert not C.llama_sampler_init_grammar(model.vocab, LEFT_RECURSIVE, b"root")
    assert BURST <= passed() <= BURST + (time.monotonic() - start) * RATE + 1

    # The errors of a call are still all there for its reason, the bucket empty or not.
    with llama_errors() as errors:
        assert not C.llama_sampler_init_grammar(model.vocab, LEFT_RECURSIVE, b"root")
    sent += 1
    assert reason(errors, "") == "unsupported grammar, left recursion detected for nonterminal at index 0"

    def one_more_passes() -> bool:
        nonlocal sent
        before = passed()
        assert not C.llama_sampler_init_grammar(model.vocab, LEFT_RECURSIVE, b"root")
        sent += 1
        return passed() > before

    # Once the bucket has refilled a line passes, after a line that says how many were left out.
    wait_until(one_more_passes, 10, message="a line to pass again")
    stopped = [int(m.group(1)) for line in lines() if (m := re.fullmatch(r"… (\d+) llama.cpp log lines suppressed",
                                                                        line))]
    assert stopped and sum(stopped) + passed() == sent
