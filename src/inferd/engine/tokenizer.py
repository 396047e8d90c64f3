"""Tokenizer of a Hugging Face folder: `tokenizer.json` via `tokenizers`, chat template via Jinja."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Encoding
from tokenizers import Tokenizer as HFTokenizer

from inferd.config import ModelLoadError, read_json_object

logger = logging.getLogger(__name__)


class BrokenChatTemplateError(ModelLoadError):
    """The model's chat template does not compile: no conversation can be rendered with it."""


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered with the model's chat template."""


class InvalidTextError(ValueError):
    """The text is not valid Unicode (a lone surrogate, as JSON's `\\ud800` escape can make)."""


def _byte_to_char() -> dict[int, str]:
    """Byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, and the other 68
    bytes for the characters from U+0100 on, in byte order (the GPT-2 convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(0x100 + index) for index, byte in enumerate(shifted)})
    return table


_BYTE_OF_CHAR = {char: byte for byte, char in _byte_to_char().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _has_byte_level_decoder(decoder: Any) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level_decoder(d) for d in decoder.get("decoders") or [])


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return str(value.get("content"))
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, path: Path) -> None:
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{path}: no tokenizer.json (inferd needs a fast tokenizer file)")
        try:
            self._tok = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise ModelLoadError(f"{tokenizer_file} is not a valid tokenizer file: {exc}") from None
        config_file = path / "tokenizer_config.json"
        config: dict[str, Any] = read_json_object(config_file) if config_file.is_file() else {}
        template = _default_template(config.get("chat_template"))
        tool_template = _named_template(config.get("chat_template"), "tool_use")
        template_source = config_file
        template_file = path / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text()
            template_source = template_file
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        added_tokens = self._tok.get_added_tokens_decoder()
        self.special_token_ids = frozenset(
            token_id for token_id, added in added_tokens.items() if added.special
        )
        self._added_token_ids = frozenset(added_tokens)
        # Set by limit_text: the longest text taken, for a context of _context_tokens tokens.
        self.max_text_chars: int | None = None
        self._context_tokens = 0
        decoder = self._tok.decoder  # its own JSON, not the whole tokenizer's
        self._byte_level = decoder is not None and _has_byte_level_decoder(json.loads(decoder.__getstate__()))
        self._template_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template_env.globals["raise_exception"] = _raise_template_error
        # Compiled once here: a template that does not compile is the model folder's fault, said
        # at start-up and to each chat request (a server error), while completions still work.
        self._template: Template | None = None
        self._template_error: str | None = None
        if template:
            try:
                self._template = self._template_env.from_string(template)  # type: ignore[arg-type]
            except Exception as exc:  # a syntax error, or a template that is not text
                self._template_error = f"the chat template of {template_source} does not compile: {exc}"
                logger.error("%s; chat requests will fail", self._template_error)
        # Hermes models ship a template of their own for conversations that offer tools.
        self._tool_template: Template | None = None
        if tool_template is not None:
            try:
                self._tool_template = self._template_env.from_string(tool_template)
            except Exception as exc:
                logger.error("the tool_use chat template of %s does not compile (%s); requests with tools "
                             "use the default one", config_file, exc)  # fmt: skip

    def use_chat_template(self, template: str, source: str) -> None:
        """Renders every conversation with ``template`` (the server's ``--chat-template``) instead
        of the folder's templates, the tool-use one among them; one that does not compile is a
        ChatTemplateError naming ``source``."""
        try:
            compiled = self._template_env.from_string(template)
        except Exception as exc:  # a syntax error
            raise ChatTemplateError(f"the chat template {source} does not compile: {exc}") from None
        self._template, self._tool_template, self._template_error = compiled, None, None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def largest_token_id(self) -> int:
        """The largest id the tokenizer can produce (added tokens included); ids may have gaps."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def limit_text(self, context_tokens: int) -> None:
        """From now on, refuse (InvalidTextError) a text that has more tokens than a context of
        ``context_tokens`` holds before tokenizing it, judged by its length alone. Tokenizing runs
        where it is asked, a server's event loop among them, and takes time and memory as the
        text's length: 8 MiB of text (19 KiB of gzip) stalled a server 7 s and took 1.2 GB, to be
        refused for its length afterwards. No token stands for more characters of text than its
        own (a byte-level piece has a character per byte, a byte-fallback one more); twice that
        leaves room for normalizers that drop characters."""
        longest = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)
        self._context_tokens = context_tokens
        self.max_text_chars = 2 * context_tokens * longest

    def _check_length(self, chars: int) -> None:
        if self.max_text_chars is not None and chars > self.max_text_chars:
            raise InvalidTextError(
                f"the text is {chars:,} characters long: more tokens than this model's context of "
                f"{self._context_tokens:,} holds (a text that could fit has at most {self.max_text_chars:,})"
            )

    def _fit(self, text: str, cut_to_fit: bool) -> str:
        """``text``, checked as `limit_text` says, or with ``cut_to_fit`` cut to the end that may
        fit (its first tokens may differ from those of the whole text: a truncation drops them)."""
        if cut_to_fit and self.max_text_chars is not None and len(text) > self.max_text_chars:
            text = text[-self.max_text_chars :]
        self._check_length(len(text))
        check_unicode(text)
        return text

    def encode(self, text: str, add_special_tokens: bool = True, cut_to_fit: bool = False) -> list[int]:
        """``cut_to_fit``: for a text kept only by its last tokens, a text too long for the context
        is cut to its end instead of refused (see ``_fit``)."""
        text = self._fit(text, cut_to_fit)
        return list(self._encoding(text, add_special_tokens).ids)

    def encode_spans(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """Each token of ``text`` with the span of characters it came from, ``(id, start, stop)``:
        empty for a special token the tokenizer added."""
        text = self._fit(text, cut_to_fit=False)
        encoding = self._encoding(text, add_special_tokens)
        spans = zip(encoding.ids, encoding.offsets, strict=True)
        return [(token_id, start, stop) for token_id, (start, stop) in spans]

    def encode_last(self, text: str, keep: int) -> list[int]:
        """``text``'s last tokens, ``keep`` in all, as transformers' left truncation gives them: the
        special tokens the tokenizer's template adds around a text (a BOS before it, an EOS after)
        are kept, and the text's own tokens are cut from the left."""
        whole = self.encode(text, cut_to_fit=True)
        if len(whole) <= keep:
            return whole
        own = self.encode(text, add_special_tokens=False, cut_to_fit=True)
        start = next((i for i in range(len(whole) - len(own) + 1) if whole[i : i + len(own)] == own), None)
        added = len(whole) - len(own)
        if start is None or keep <= added:  # no text inside the template, or no room for any of it
            return whole[-keep:]
        return whole[:start] + own[len(own) - (keep - added) :] + whole[start + len(own) :]

    def encode_pair(self, first: str, second: str, cut_to_fit: bool = False) -> list[int]:
        """Two texts as one input, joined as the tokenizer's pair template joins them (the
        ``text_pair`` of transformers' tokenizers): what a cross-encoder reads. ``cut_to_fit``: for
        a pair kept only by its last tokens, texts too long together are cut to the end that may
        fit (the first text's start goes first) instead of refused."""
        room = self.max_text_chars
        if cut_to_fit and room is not None and len(first) + len(second) > room:
            second = second[-room:]
            first = first[len(first) - (room - len(second)) :] if room > len(second) else ""
        self._check_length(len(first) + len(second))
        check_unicode(first)
        check_unicode(second)
        return list(self._encoding((first, second), add_special_tokens=True).ids)

    def _encoding(self, text: str | tuple[str, str], add_special_tokens: bool) -> Encoding:
        """The tokenizers library's encoding of ``text`` (or of a pair). Through ``encode_batch``,
        which lets go of the GIL while it works (``encode`` holds it: a 1.8 s encode let a 1 ms
        timer thread run twice), so a server that tokenizes on a thread of its own keeps its event
        loop answering meanwhile."""
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        token: str | None = self._tok.id_to_token(token_id)
        return token

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also when they are part of a character (where `decode`
        gives U+FFFD): what OpenAI's logprob `bytes` are for, so clients can join split characters."""
        token = self.id_to_token(token_id)
        if token is None or token_id in self._added_token_ids:
            return self.decode([token_id], skip_special_tokens=False).encode()
        if self._byte_level:
            try:
                return bytes(_BYTE_OF_CHAR[char] for char in token)
            except KeyError:  # not a byte-level piece after all
                return self.decode([token_id], skip_special_tokens=False).encode()
        byte_fallback = _BYTE_FALLBACK.fullmatch(token)  # SentencePiece's "<0xE2>" pieces
        if byte_fallback:
            return bytes([int(byte_fallback.group(1), 16)])
        return self.decode([token_id], skip_special_tokens=False).encode()

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> str:
        """The conversation as the model's template renders it. ``template_kwargs``: more variables
        for the template (e.g. Qwen3's ``enable_thinking``). ``continue_final_message``: the text
        ends with the last message's content, left open for the model to go on with (the template's
        end-of-turn markup after it is cut)."""
        if self._template_error is not None:
            raise BrokenChatTemplateError(self._template_error)
        template = self._template
        if (template_kwargs or {}).get("tools") and self._tool_template is not None:
            template = self._tool_template
        if template is None:
            raise ChatTemplateError("this model has no chat template; use the completions API instead")
        try:
            rendered = template.render(
                **(template_kwargs or {}),
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        except Exception as exc:  # a template that breaks on this conversation fails it alone
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        if not continue_final_message:
            return rendered
        final = str(messages[-1].get("content") or "") if messages else ""
        if not final.strip():
            raise ChatTemplateError("continue_final_message: the last message has no text to continue")
        # Templates may trim a message (Llama 3's do): look for its text without the spaces around
        # it, and keep trailing spaces only where the template kept them too, as transformers does.
        start = rendered.rfind(final.strip())
        if start < 0:
            raise ChatTemplateError("continue_final_message: the template does not show the last message")
        kept = final.lstrip()
        shown_whole = rendered[start : start + len(kept)] == kept
        return rendered[: start + len(kept if shown_whole else final.strip())]


def check_unicode(text: str) -> None:
    """Refuse (InvalidTextError) a text the tokenizer cannot read: not valid Unicode (a lone
    surrogate a JSON body may carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidTextError(f"text is not valid Unicode: {exc.reason} at {exc.start}") from None


def _default_template(value: object) -> object:
    """The chat template of ``tokenizer_config.json``'s ``chat_template``: a string, or a list of
    named templates (``{"name", "template"}``), whose "default" entry is the chat one. Anything
    else is returned as it is, to fail as a template that does not compile."""
    if isinstance(value, list):
        return _named_template(value, "default") or value
    return value


def _named_template(value: object, name: str) -> str | None:
    """The template called ``name`` in a list of named templates, if there is one."""
    if not isinstance(value, list):
        return None
    named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
    found = named.get(name)
    return found if isinstance(found, str) else None


def _raise_template_error(message: str) -> None:
    raise ChatTemplateError(message)
