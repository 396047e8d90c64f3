"""What a chat answer's text becomes in the response: thinking apart (`--reasoning-parser`), tool
calls read out (`--tool-call-parser`, or the JSON a forced `tool_choice` made), the rest content.
One shaper per choice serves a whole answer and its stream deltas alike, so `create()` and a
streamed answer put together agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inferd.server.forced_tool_calls import ForcedCalls
from inferd.server.reasoning import ReasoningFormat, ReasoningSplitter
from inferd.server.tool_calls import ParsedToolCall, tool_call_reader


@dataclass
class ShapedText:
    reasoning: str = ""
    content: str = ""
    calls: list[ParsedToolCall] = field(default_factory=list)


class AnswerShaper:
    """Feed one choice's text in order (`finished` with the last piece)."""

    def __init__(
        self,
        reasoning: ReasoningFormat | None,
        tool_parser: str | None,
        one_call: bool,
        forced: ForcedCalls | None = None,
        structured: bool = False,
        keep_reasoning: bool = True,
    ) -> None:
        """``forced``: the answer (after the thinking, if any) is the JSON of forced calls, no call
        blocks, read once it is whole; streamed, the calls come with its last delta.
        ``structured``: the answer after the thinking matches a constraint: all answer from there.
        ``keep_reasoning`` false: the thinking is split off and left out (vLLM's
        ``include_reasoning``)."""
        self._keep_reasoning = keep_reasoning
        self._forced = forced
        self._forced_text: list[str] = []
        self._splitter = ReasoningSplitter(reasoning, reopens=not structured) if reasoning else None
        self._reader = tool_call_reader(tool_parser) if tool_parser is not None else None
        self._one_call = one_call  # parallel_tool_calls false: the first call only
        self.calls_sent = 0
        # With tools: spaces at the end of the content so far, held until text follows them. A turn
        # of calls alone then has no content at all, as a whole answer's is null.
        self._held_space = ""
        self._content_sent = False

    def feed(self, text: str, finished: bool) -> ShapedText:
        shaped = self._shape(text, finished)
        if not self._keep_reasoning:
            shaped.reasoning = ""
        return shaped

    def _shape(self, text: str, finished: bool) -> ShapedText:
        shaped = ShapedText(content=text)
        if self._splitter is not None:
            shaped.reasoning, shaped.content = self._splitter.feed(text)
            if finished:  # a held-back tail that never became a tag is text
                reasoning, content = self._splitter.finish()
                shaped.reasoning, shaped.content = shaped.reasoning + reasoning, shaped.content + content
        if self._forced is not None:
            return self._feed_forced(shaped, finished)
        if self._reader is None:
            return shaped
        shaped.content, calls = self._reader.feed(shaped.content)
        if finished:  # what the reader held: calls, or content (an unclosed block, a held tail)
            content, last_calls = self._reader.finish()
            shaped.content += content
            calls += last_calls
        if self._one_call:
            calls = calls[: max(0, 1 - self.calls_sent)]
        shaped.calls = calls
        self.calls_sent += len(calls)
        content = self._held_space + shaped.content
        kept = content.rstrip()
        self._held_space = content[len(kept) :]
        if finished and (self._content_sent or kept or not self.calls_sent):
            kept, self._held_space = kept + self._held_space, ""
        self._content_sent = self._content_sent or bool(kept)
        shaped.content = kept
        return shaped

    def _feed_forced(self, shaped: ShapedText, finished: bool) -> ShapedText:
        """The thinking goes out as it comes; the rest is held until the answer is whole."""
        self._forced_text.append(shaped.content)
        if not finished:
            return ShapedText(reasoning=shaped.reasoning)
        assert self._forced is not None
        whole = "".join(self._forced_text)
        calls = self._forced.read(whole)
        if calls is None:  # cut off before the JSON was whole: left as the content it is
            return ShapedText(reasoning=shaped.reasoning, content=whole)
        self.calls_sent += len(calls)
        return ShapedText(reasoning=shaped.reasoning, calls=calls)
