"""Tool calls: how each model family writes them, and the grammar that makes them valid.

A family is recognised from the model's chat template (the markers it renders a call
with) and, for a file without a template, from its vocabulary. Each writes a call its own
way (Syntax); edgellm makes the model write exactly that, through a grammar whose
arguments are each tool's parameter schema (grammar.py): a forced call (tool_choice
`required` or a named tool) from the first token, a free one (`auto`) from the moment
the model writes the family's trigger (sampling.py). So the arguments always parse and
validate, whatever the model's weights; calls.py reads them back out of the text.

A template that has no place for tools (`tools` is not among its variables, or a
llama.cpp built-in one) gets them as a system message instead, with the syntax to call
them; calls and results in the history become text it can render (docs/tools.md).
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgellm.engine.errors import SchemaError
from edgellm.engine.grammar import Grammar, gemma_text, literal


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments: an object

    def declaration(self) -> dict[str, Any]:
        """OpenAI's shape, the one chat templates are written for."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and what it asks of them."""

    tools: tuple[Tool, ...]
    choice: str = "auto"  # "none", "auto", "required", or "function": the one named
    name: str | None = None  # the tool a "function" choice names
    parallel: bool = True  # several calls in one reply (where the family's syntax has a way)

    @property
    def callable(self) -> tuple[Tool, ...]:
        """The tools the reply may call."""
        return tuple(t for t in self.shown if self.choice != "function" or t.name == self.name)

    @property
    def shown(self) -> tuple[Tool, ...]:
        """The tools the prompt shows: all of them, even when one is named (as OpenAI's API does:
        the model knows what else there is), and none with tool_choice none."""
        return () if self.choice == "none" else self.tools


@dataclass(frozen=True)
class Syntax:
    """How one family writes its calls: opening, then per call the name, `middle`, the arguments
    and `tail`; `between` from one call's tail to the next one's name; `close` after the last."""

    family: str
    openings: tuple[str, ...]  # text before the first name; a forced call writes the first
    triggers: tuple[str, ...]  # per opening, what starts a call when the model writes freely
    anchored: tuple[bool, ...] | None = None  # per trigger: only at the reply's start (a bare JSON object)
    middle: str = '", "arguments": '
    tail: str = "}"
    between: str | None = ', {"name": "'  # None: one call per reply
    close: str = "]"
    id_length: int = 0  # ids of this many letters and digits (Mistral's templates insist); 0: OpenAI's
    dialect: str = "json"  # how arguments are written: JSON, or "gemma" (FunctionGemma's, grammar.gemma_text)

    def arguments(self, value: dict[str, Any]) -> str:
        return gemma_text(value) if self.dialect == "gemma" else json.dumps(value, ensure_ascii=False)

    def write(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        """Calls as the model writes them: for templates without tools, and for docs."""
        texts = [f"{name}{self.middle}{self.arguments(arguments)}{self.tail}" for name, arguments in calls]
        if self.between is None:
            return "".join(self.openings[0] + text + self.close for text in texts)
        return self.openings[0] + self.between.join(texts) + self.close

    def new_id(self) -> str:
        if self.id_length:
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(self.id_length))
        return "call_" + secrets.token_hex(12)

    @property
    def markers(self) -> str:
        """All the text of the syntax around names and arguments (to find its tokens)."""
        quote = "<escape>" if self.dialect == "gemma" else ""  # what FunctionGemma's strings begin and end with
        return "".join((*self.openings, self.middle, self.tail, self.between or "", self.close, quote))


_HEAD = '{"name": "'
HERMES = Syntax("hermes", ("<tool_call>\n" + _HEAD,), ("<tool_call>",),
                between="\n</tool_call>\n<tool_call>\n" + _HEAD, close="\n</tool_call>")
LLAMA3 = Syntax("llama3", (_HEAD, "<|python_tag|>" + _HEAD), ('{"name"', "<|python_tag|>"), (True, False),
                middle='", "parameters": ', between=None, close="")
MISTRAL = Syntax("mistral", ("[TOOL_CALLS][" + _HEAD,), ("[TOOL_CALLS]",), id_length=9)
PHI4 = Syntax("phi4", ("<|tool_call|>[" + _HEAD,), ("<|tool_call|>",), close="]<|/tool_call|>")
FUNCTIONGEMMA = Syntax("functiongemma", ("<start_function_call>call:",), ("<start_function_call>",), middle="",
                       tail="", between="<end_function_call><start_function_call>call:", close="<end_function_call>",
                       dialect="gemma")
GENERIC = Syntax("generic", ('{"tool_calls": [' + _HEAD,), ('{"tool_calls"',), (True,), close="]}")
# What gives a family away, in a template's text or as a token of the vocabulary.
_SIGNS = ((FUNCTIONGEMMA, "<start_function_call>"), (PHI4, "<|tool_call|>"), (MISTRAL, "[TOOL_CALLS]"),
          (HERMES, "<tool_call>"), (LLAMA3, "<|python_tag|>"),
          (LLAMA3, '"parameters": dictionary of argument name'),  # Meta's words in Llama 3.1-3.3's templates
          (PHI4, "<|tool|>"))  # Phi-4-mini's template renders tools so, and leaves calls to the model


def syntax_for(template: str | None, has_token: Callable[[str], bool]) -> Syntax:
    """The family whose syntax a model writes calls in: from its template, else its vocabulary."""
    for syntax, sign in _SIGNS:
        if template and sign in template:
            return syntax
    if not template or "tools" not in template:
        for syntax, sign in _SIGNS:
            if has_token(sign):
                return syntax
    return GENERIC


@dataclass(frozen=True)
class CallGrammar:
    """The grammar of a reply's calls, without its root: the root chosen when the sampler starts
    it says how much of the opening is already written (see source())."""

    rules: str  # the rule `calls` is what follows an opening
    openings: tuple[str, ...]
    triggers: tuple[str, ...]
    anchored: tuple[bool, ...]
    forced: bool  # from the first token; else from the first trigger the model writes

    def source(self, opening: int, written: int = 0) -> bytes:
        """GBNF for the rest of the reply, once `written` characters of opening `opening` are out."""
        rest = self.openings[opening][written:]
        return (f"root ::= {literal(rest) + ' ' if rest else ''}calls\n{self.rules}").encode()


def call_grammar(syntax: Syntax, use: ToolUse, check: Callable[[], None] | None = None) -> CallGrammar:
    """The calls `use` allows, written in `syntax`. SchemaError names the tool whose parameters
    the grammar cannot enforce."""
    grammar = Grammar(check, dialect=syntax.dialect)
    calls = []
    for tool in use.callable:
        index = use.tools.index(tool)
        try:
            arguments = grammar.schema(tool.parameters, f"{tool.name}-args")
        except SchemaError as e:
            raise SchemaError(f"tools[{index}].function.parameters: {e.message}",
                              param=f"tools[{index}].function.parameters") from None
        calls.append(f"{literal(tool.name + syntax.middle)} {arguments}" + (f" {literal(syntax.tail)}"
                                                                            if syntax.tail else ""))
    call = grammar.rule("call", "(" + " | ".join(calls) + ")")
    close = f" {literal(syntax.close)}" if syntax.close else ""
    if use.parallel and syntax.between is not None:
        grammar.rule("calls", f"{call} ({literal(syntax.between)} {call}){{0,{MAX_CALLS - 1}}}{close}")
    else:
        grammar.rule("calls", f"{call}{close}")
    anchored = syntax.anchored or (False,) * len(syntax.triggers)
    return CallGrammar(grammar.text(), syntax.openings, syntax.triggers, anchored, forced=use.choice != "auto")


MAX_CALLS = 16  # calls in one reply


class Watch:
    """Where a call begins in a reply the model writes freely (tool_choice auto): at the first
    trigger in its text, where a trigger that is the start of a bare JSON object (Llama 3's
    `{"name"`, the generic `{"tool_calls"`) counts only at the start of the reply, so that JSON
    shown in an answer is not taken for a call. The sampler keeps one to start the grammar
    there, the reader one to find the call: fed the same text, they agree."""

    def __init__(self, grammar: CallGrammar) -> None:
        self._triggers = grammar.triggers
        self._anchored = grammar.anchored
        self.tail = ""  # the end of the text so far that may be the start of a trigger
        self._blank = True  # the text before the tail is all whitespace

    def find(self, piece: str) -> tuple[str, int | None, int]:
        """The text so far from the tail on (the tail, then `piece`), where in it a call begins (None:
        not yet; the tail then moves on) and with which trigger."""
        text = self.tail + piece
        found = [(i, n) for n, t in enumerate(self._triggers) if (i := text.find(t)) >= 0 and self._may(n, text[:i])]
        if found:
            start, trigger = min(found)
            return text, start, trigger
        keep = next((k for k in range(min(max(map(len, self._triggers)) - 1, len(text)), 0, -1)
                     if self.begun(text[-k:], text[:-k]) is not None), 0)
        if text[:len(text) - keep].strip():
            self._blank = False
        self.tail = text[len(text) - keep:]
        return text, None, -1

    def begun(self, partial: str, before: str = "") -> int | None:
        """The trigger that `partial`, written after `before`, is the start of (not all of)."""
        return next((n for n, t in enumerate(self._triggers)
                     if partial and t.startswith(partial) and t != partial and self._may(n, before)), None)

    def _may(self, trigger: int, before: str) -> bool:
        return not self._anchored[trigger] or (self._blank and not before.strip())


# --- how tools reach the template ----------------------------------------------------------

def rendering(template: str | None) -> str:
    """Where a template puts tools: "tools" (the `tools` variable, as transformers passes it),
    "system" (a system message's `tools` key, as Phi-4-mini's), or "text" (nowhere: edgellm
    writes them into a system message)."""
    if template is None:
        return "text"
    if re.search(r"""message\[['"]tools['"]\]|message\.tools\b""", template):
        return "system"
    return "tools" if re.search(r"\btools\b", template) else "text"


def with_tools(syntax: Syntax, where: str, use: ToolUse,
               messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the `tools` variable that render `use` (where: see rendering())."""
    if where == "tools":
        return messages, [t.declaration() for t in use.shown] or None
    declared = json.dumps([t.declaration()["function"] for t in use.shown], ensure_ascii=False)
    if where == "system":  # the template renders results (role tool) but not calls
        out = [_calls_as_text(syntax, m) for m in messages]
        if use.shown:
            first = out[0] if out and out[0].get("role") == "system" else {"role": "system", "content": ""}
            out = [{**first, "tools": declared}, *(out[1:] if first is out[0] else out)]
        return out, None
    example = syntax.write([("FUNCTION_NAME", {"ARGUMENT": "VALUE"})])
    note = (f"You can call these functions (each with its JSON schema of arguments):\n{declared}\n"
            f"To call them, reply with this and nothing else:\n{example}")
    out = []
    for message in map(functools.partial(_calls_as_text, syntax), messages):
        if message.get("role") != "tool":
            out.append(message)
            continue
        result = f"Result of {message.get('name') or 'the function'}: {message.get('content') or ''}"
        if out and out[-1].get("role") == "user" and out[-1].get("results"):  # one turn for a call's results
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + result}
        else:
            out.append({"role": "user", "content": result, "results": True})
    out = [{k: v for k, v in m.items() if k != "results"} for m in out]
    if not use.shown:
        return out, None
    if out and out[0].get("role") == "system":
        return [{**out[0], "content": f"{out[0].get('content') or ''}\n\n{note}".lstrip()}, *out[1:]], None
    return [{"role": "system", "content": note}, *out], None


class Written(str):
    """Text edgellm wrote around the client's, such as a call in its family's syntax, whose markers
    may be control tokens (`<|tool_call|>`). `client` is the client's part: only when that spells
    no control token does the rest keep its control tokens (chat.ChatTemplate.tokens)."""

    client: str

    def __new__(cls, text: str, client: str) -> Written:
        written = super().__new__(cls, text)
        written.client = client
        return written


def _calls_as_text(syntax: Syntax, message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's calls as the text the model wrote them in."""
    if message.get("role") != "assistant" or not message.get("tool_calls"):
        return message
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    content = message.get("content") or ""
    client = "\n".join([content, *(f"{name}\n{syntax.arguments(arguments)}" for name, arguments in calls)])
    return {"role": "assistant", "content": Written(content + syntax.write(calls), client)}
