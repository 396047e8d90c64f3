"""A reasoning model's thinking apart from its answer (`--reasoning-parser`): chat responses carry
the thinking (the text up to `</think>`, a leading `<think>` dropped) as `reasoning_content` and the
rest as `content`, as vLLM's reasoning parsers give them.

The same state machine runs over a whole answer and over its streamed deltas, so the two always
split alike. A tag may arrive cut over two deltas: the tail of a delta that could begin one is
held back until the next delta (or the end) says what it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningFormat:
    start: str
    end: str
    # The answer begins inside the thinking: the chat template opened it in the prompt, or the
    # model opens it first thing (its start tag is then dropped as markup).
    starts_inside: bool


REASONING_FORMATS = {
    # Qwen3 writes "<think>" itself, or (the Thinking-2507 models) its template ends the prompt
    # with it: either way the answer is thinking until "</think>". With enable_thinking false
    # there is none to split off (`openai/chat.py`).
    "qwen3": ReasoningFormat("<think>", "</think>", starts_inside=True),
    "deepseek_r1": ReasoningFormat("<think>", "</think>", starts_inside=True),
}


class ReasoningSplitter:
    """Feed an answer's text in order; each call returns the (reasoning, content) text it settles."""

    def __init__(self, form: ReasoningFormat, reopens: bool = True) -> None:
        """``reopens`` false: once the thinking ends, the rest is all answer, a start tag in it
        included (a structured answer, whose JSON may hold the tag's text)."""
        self._form = form
        self._inside = form.starts_inside
        self._reopens = reopens
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        text = self._held + text
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            # Inside, a start tag is markup to drop (DeepSeek-R1 may repeat the prompt's); the
            # end tag closes the thinking. Outside, a start tag opens it.
            tags = (self._form.end, self._form.start) if self._inside else (self._form.start,) * self._reopens
            found = [(text.find(tag), tag) for tag in tags if tag in text]
            side = reasoning if self._inside else content
            if found:
                at, tag = min(found)
                side.append(text[:at])
                text = text[at + len(tag) :]
                if tag == self._form.end or not self._inside:
                    self._inside = not self._inside
                continue
            keep = max((prefix_overlap(text, tag) for tag in tags), default=0)
            side.append(text[: len(text) - keep])
            self._held = text[len(text) - keep :]
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What was held back at the end: text, not a tag after all."""
        held, self._held = self._held, ""
        return (held, "") if self._inside else ("", held)


def prefix_overlap(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (shorter than the tag)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def prompt_closes_thinking(prompt: str, form: ReasoningFormat, prefill: str | None = None) -> bool:
    """Whether the thinking is closed before the answer begins, so that the answer is all answer:
    the prompt ends with the end tag (Qwen3's template with enable_thinking false ends it with
    "<think>\n\n</think>\n\n"), or the prefilled start of the answer (``prefill``, the message a
    request continues) has an end tag after its last start tag. Tags earlier in the prompt (a
    system prompt about them, earlier turns' thinking) say nothing about this answer."""
    if prompt.rstrip().endswith(form.end):
        return True
    if prefill is None:
        return False
    end = prefill.rfind(form.end)
    return end >= 0 and end > prefill.rfind(form.start)
