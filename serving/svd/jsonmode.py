"""JSON mode for the SVD server (`response_format: {"type": "json_object"}`): a character-level
pushdown recognizer of JSON-object prefixes and the constrained token choice built on it.

OUR DESIGN (no grammar library): at each step the decoder ranks the candidate tokens of the
(steered) logits and keeps the most likely one whose text leaves the output a prefix of one
JSON object (sampling, when temperature > 0, draws among the valid candidates only). The
request finishes ("stop") when the object is complete; at max_tokens it ends with
finish_reason "length", possibly incomplete, as OpenAI's JSON mode does.
"""

from __future__ import annotations

import re

import torch

_NUMBER_PREFIX = re.compile(r"-?(0|[1-9]\d*)?(\.\d*)?([eE][+-]?\d*)?")
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_LITERALS = ("true", "false", "null")


class JSONPrefix:
    """Feed characters; `feed` returns False (and the state is then unusable) as soon as the
    text can no longer be the beginning of one JSON object. `complete` is True once the
    object is closed. Whitespace is refused before the object and after it."""

    def __init__(self):
        self.stack: list[str] = []
        self.state = "start"
        self.in_key = False
        self.escape = False
        self.token = ""          # the number or literal being read

    def copy(self) -> "JSONPrefix":
        other = JSONPrefix.__new__(JSONPrefix)
        other.__dict__ = {**self.__dict__, "stack": list(self.stack)}
        return other

    @property
    def complete(self) -> bool:
        return self.state == "done"

    def feed(self, text: str) -> bool:
        return all(self._char(ch) for ch in text)

    def _close_value(self) -> None:
        self.state = "done" if not self.stack else "comma_or_end"

    def _char(self, ch: str) -> bool:  # noqa: C901 - one state machine
        st = self.state
        if st == "string":
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                if self.in_key:
                    self.in_key, self.state = False, "colon"
                else:
                    self._close_value()
            elif ord(ch) < 0x20:
                return False
            return True
        if st == "number":
            if _NUMBER_PREFIX.fullmatch(self.token + ch):
                self.token += ch
                return True
            if not _NUMBER.fullmatch(self.token):
                return False
            self._close_value()
            return self._char(ch)
        if st == "literal":
            if any(word.startswith(self.token + ch) for word in _LITERALS):
                self.token += ch
                if self.token in _LITERALS:
                    self._close_value()
                return True
            return False
        if ch in " \n\t\r":
            return st not in ("start", "done")
        if st in ("start", "done"):
            if st == "done" or ch != "{":
                return False
            self.stack.append("{")
            self.state = "key_or_end"
            return True
        if st in ("key_or_end", "key"):
            if ch == '"':
                self.state, self.in_key = "string", True
                return True
            if ch == "}" and st == "key_or_end":
                self.stack.pop()
                self._close_value()
                return True
            return False
        if st == "colon":
            if ch == ":":
                self.state = "value"
                return True
            return False
        if st in ("value", "value_or_end"):
            if ch == "]" and st == "value_or_end":
                self.stack.pop()
                self._close_value()
            elif ch == '"':
                self.state, self.in_key = "string", False
            elif ch in "{[":
                self.stack.append(ch)
                self.state = "key_or_end" if ch == "{" else "value_or_end"
            elif ch in "-0123456789":
                self.state, self.token = "number", ch
            elif ch in "tfn":
                self.state, self.token = "literal", ch
            else:
                return False
            return True
        if st == "comma_or_end":
            top = self.stack[-1]
            if ch == ",":
                self.state = "key" if top == "{" else "value"
                return True
            if (ch, top) in (("}", "{"), ("]", "[")):
                self.stack.pop()
                self._close_value()
                return True
        return False


def constrained_choice(logits: torch.Tensor, state: JSONPrefix, decode, temperature: float,
                       generator: torch.Generator | None, candidates: int = 256) -> int:
    """The most likely token (greedy) or a sampled one among the `candidates` most likely,
    restricted to tokens whose text `decode(id)` keeps `state` a JSON-object prefix; the
    rest of the vocabulary is searched in order when none of those fits. Feeds the chosen
    token's text into `state`."""
    order = torch.argsort(logits.float(), descending=True)
    for start in (0, candidates):
        chunk = order[start:candidates] if start == 0 else order[candidates:]
        valid = []
        for token in chunk.tolist():
            text = decode(token)
            if text and logits[token] > float("-inf") and state.copy().feed(text):
                valid.append(token)
                if temperature <= 0:
                    break
        if valid:
            if temperature <= 0:
                choice = valid[0]
            else:
                z = logits[valid].float() / temperature
                choice = valid[int(torch.multinomial(torch.softmax(z, -1), 1, generator=generator))]
            state.feed(decode(choice))
            return choice
    raise RuntimeError("no token continues the JSON object")
