"""Reading a reply's tool calls back out of its text, as it streams.

The grammar (tools.py) fixes the layout of every call, so reading one needs no
guessing: the reply is content up to the first trigger the model writes, then the
calls, each its name, then its arguments (a JSON object, streamed as it is written),
then what the syntax puts between calls or after the last. Content that could be the
start of a trigger is held back until the next text shows whether it is one, as stop
strings are (text.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edgellm.engine.stream import Event, Finish, Text
from edgellm.engine.tools import CallGrammar, Syntax, Watch


@dataclass(frozen=True)
class CallStart:
    """A call begins: its place among the reply's calls, its id and the tool's name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """The next piece of a call's arguments (JSON text; the pieces joined are the whole object)."""

    index: int
    text: str


CallEvent = Event | CallStart | CallArguments
_NAME = re.compile(r"[A-Za-z0-9_-]*")


class CallReader:
    """Turns the text events of one reply into content, calls and their arguments."""

    def __init__(self, syntax: Syntax, grammar: CallGrammar) -> None:
        self._syntax = syntax
        self._watch = Watch(grammar)  # its tail: content held back, as it may be the start of a trigger
        self._openings = grammar.openings
        self._calling = False
        self._text = ""  # the calls' text
        self._at = 0  # how far it has been read
        self._stage = "opening"
        self._index = -1
        self._depth = 0  # brackets open in the arguments being read
        self._in_string = False
        self._escaped = False
        self.completed = 0  # calls whose arguments are whole

    def feed(self, event: Text | Finish) -> list[CallEvent]:
        if isinstance(event, Finish):
            held = self._watch.tail
            out = self._read(final=True) if self._calling else ([Text(held)] if held else [])
            reason = "tool_calls" if self.completed and event.reason == "stop" else event.reason
            return [*out, Finish(reason, event.usage)]
        if self._calling:
            self._text += event.text
            return self._read(final=False)
        text, start, _ = self._watch.find(event.text)
        if start is None:
            content = text[:len(text) - len(self._watch.tail)]
            return [Text(content)] if content else []
        self._calling, self._text = True, text[start:]
        return [*([Text(text[:start])] if start else []), *self._read(final=False)]

    def _read(self, *, final: bool) -> list[CallEvent]:
        out: list[CallEvent] = []
        syntax, text = self._syntax, self._text
        while True:
            rest = text[self._at:]
            if self._stage == "opening":
                opening = next((o for o in self._openings if rest.startswith(o)), None)
                if opening is None:
                    if not final and any(o.startswith(rest) for o in self._openings):
                        return out
                    self._stage = "done"  # not a call after all (only a cut-short reply gets here)
                    continue
                self._at += len(opening)
                self._stage = "name"
            elif self._stage == "name":
                match = _NAME.match(rest)
                assert match is not None
                if match.end() == len(rest) and not final:
                    return out
                self._index += 1
                out.append(CallStart(self._index, syntax.new_id(), match.group()))
                self._at += match.end()
                self._stage = "middle"
            elif self._stage in ("middle", "tail"):
                expected = syntax.middle if self._stage == "middle" else syntax.tail
                if self._stage == "tail":
                    skipped = len(rest) - len(rest.lstrip(" "))  # the grammar's optional space
                    self._at += skipped
                    rest = rest[skipped:]
                if len(rest) < len(expected) and not final:
                    return out
                self._at += len(expected)
                self._stage = "arguments" if self._stage == "middle" else "next"
            elif self._stage == "arguments" and syntax.dialect == "gemma":
                # Read whole, then given as JSON: the end of the call marks the end of its arguments
                # (a FunctionGemma string cannot hold the "<" that begins it).
                end = rest.find(syntax.close)
                if end < 0 and not final:
                    return out
                end = len(rest) if end < 0 else end
                try:
                    value, used = _gemma_value(rest, 0)
                except (ValueError, IndexError, RecursionError):  # cut short, or nested past reading
                    value, used = None, -1
                if used == end:
                    out.append(CallArguments(self._index, json.dumps(value, ensure_ascii=False)))
                    self.completed += 1
                self._at += end
                self._stage = "tail" if used == end else "done"
            elif self._stage == "arguments":
                end = self._scan(rest)
                piece = rest[:end]
                if piece:
                    out.append(CallArguments(self._index, piece))
                self._at += end
                if self._depth or end == 0 or not rest[:end].strip():
                    return out  # the arguments go on in the next text (or were cut short)
                self.completed += 1
                self._stage = "tail"
            elif self._stage == "next":
                between = syntax.between
                if between is not None and rest.startswith(between):
                    self._at += len(between)
                    self._stage = "name"
                elif between is not None and between.startswith(rest) and not final:
                    return out  # the next call, or the close: the next text tells
                else:
                    self._stage = "done"
            else:  # done: the grammar lets nothing follow but the close
                return out

    def _scan(self, text: str) -> int:
        """How much of `text` belongs to the arguments: up to and with the bracket that closes them."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(text)



_GEMMA_ATOM = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|None|null")
_GEMMA_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GEMMA_WORDS = {"true": True, "false": False, "None": None, "null": None}


def _gemma_value(text: str, at: int) -> tuple[object, int]:
    """A value FunctionGemma wrote (grammar.gemma_text) at `at`, and where it ends."""
    if text.startswith("<escape>", at):
        end = text.index("<escape>", at + 8)
        return text[at + 8:end], end + 8
    if text[at] in "{[":
        closing = "}" if text[at] == "{" else "]"
        items: list = []
        at += 1
        while text[at] != closing:
            if items:
                if text[at] != ",":
                    raise ValueError("expected a comma")
                at += 1
            if closing == "}":
                key = _GEMMA_KEY.match(text, at)
                if key is None or text[key.end()] != ":":
                    raise ValueError("expected a key")
                value, at = _gemma_value(text, key.end() + 1)
                items.append((key.group(), value))
            else:
                value, at = _gemma_value(text, at)
                items.append(value)
        return (dict(items) if closing == "}" else items), at + 1
    atom = _GEMMA_ATOM.match(text, at)
    if atom is None:
        raise ValueError("expected a value")
    word = atom.group()
    return (_GEMMA_WORDS[word] if word in _GEMMA_WORDS else json.loads(word)), atom.end()
