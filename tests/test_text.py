"""TextAssembler: UTF-8 held back until complete, stop strings held back until resolved."""

from __future__ import annotations

import pytest

from edgellm.engine.text import TextAssembler, Utf8Decoder


def run(pieces: list[bytes], stops: tuple[str, ...] = ()) -> tuple[list[str], str, bool]:
    text = TextAssembler(stops)
    emitted = []
    for piece in pieces:
        emitted.append(text.feed(piece))
        if text.stopped:
            break
    return emitted, text.finish(), text.stopped


def test_plain_text_passes_straight_through():
    assert run([b"Hel", b"lo"]) == (["Hel", "lo"], "", False)


def test_multibyte_character_split_across_pieces_is_held_until_complete():
    euro = "€".encode()  # three bytes
    emitted, tail, _ = run([b"a" + euro[:1], euro[1:2], euro[2:] + b"b"])
    assert emitted == ["a", "", "€b"]
    assert tail == ""


def test_incomplete_utf8_at_the_end_becomes_a_replacement_character():
    assert run([b"ok", "€".encode()[:2]]) == (["ok", ""], "\ufffd", False)


def test_stop_string_spanning_two_pieces_is_cut_and_never_emitted():
    emitted, tail, stopped = run([b" wor", b"ld!"], stops=("orld",))
    assert emitted == [" w", ""] and tail == "" and stopped


def test_stop_string_inside_one_piece():
    assert run([b"one. STOP two"], stops=("STOP",)) == (["one. "], "", True)


def test_earliest_of_several_stops_wins():
    emitted, _, stopped = run([b"abc"], stops=("c", "b"))
    assert emitted == ["a"] and stopped


def test_partial_match_is_released_when_it_fails():
    emitted, tail, stopped = run([b"Hel", b"lo", b" there"], stops=("Help",))
    assert "".join(emitted) + tail == "Hello there" and not stopped
    assert emitted[0] == ""  # "Hel" might have begun "Help"


def test_partial_match_at_the_end_is_released_by_finish():
    emitted, tail, stopped = run([b"Hel"], stops=("Help",))
    assert emitted == [""] and tail == "Hel" and not stopped


def test_stop_string_made_of_a_split_multibyte_character():
    euro = "€".encode()
    emitted, tail, stopped = run([b"x" + euro[:2], euro[2:] + b"y"], stops=("€",))
    assert emitted == ["x", ""] and stopped and tail == ""


@pytest.mark.parametrize("data,expected", [
    (b"plain \xe2\x82\xac", "plain \u20ac"),
    (b"\xed\xa0\x80x", "\ufffdx"),          # a UTF-16 surrogate: one character to the grammar, one here
    (b"\xe0\x82\x80x", "\ufffdx"),          # overlong form of U+0080
    (b"\xc1\x81x", "\ufffdx"),              # overlong 'A'
    (b"\xf5\x80\x80\x80x", "\ufffdx"),      # beyond U+10FFFF
    (b"\x80x", "\ufffdx"),                  # a stray continuation byte
    (b"\xe2\x82x", "\ufffdx"),              # a character cut short
])
def test_each_malformed_sequence_is_one_replacement_character(data, expected):
    decoder = Utf8Decoder()
    assert "".join(decoder.decode(data[i:i + 1]) for i in range(len(data))) + decoder.decode(b"", True) == expected
    assert Utf8Decoder().decode(data, final=True) == expected
