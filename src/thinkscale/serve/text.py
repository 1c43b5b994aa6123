"""What a client sees of a completion: the think part apart from the answer, cut at stop strings, and
streamed as text deltas that never split a tag, a stop string or a multi-byte character."""
from __future__ import annotations

from dataclasses import dataclass

from thinkscale.reflect.answer import cut_at_stop

REPLACEMENT = "\ufffd"  # what a tokenizer writes for the first bytes of a character still being generated


def opens_think(prompt_text: str, think_tags: tuple[str, str] | None) -> bool:
    """Whether the prompt leaves the model inside a think block (its last think tag is a start tag)."""
    if think_tags is None:
        return False
    start, end = think_tags
    return prompt_text.rfind(start) > prompt_text.rfind(end)


def split_reasoning(text: str, think_tags: tuple[str, str] | None, in_think: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a completion. A completion that starts inside a think block (the prompt
    opened it, or the completion does) is reasoning up to the end tag and content after it; one that never
    closes the block is all reasoning. Without think tags it is all content."""
    if think_tags is None:
        return None, text
    start, end = think_tags
    body = text.lstrip()
    if not in_think and body.startswith(start):
        in_think, text = True, body[len(start):]
    if not in_think:
        return None, text
    reasoning, found, content = text.partition(end)
    return reasoning.strip("\n"), content.lstrip() if found else ""


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters may be the start of a marker (or an unfinished character)."""
    hold = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:n]):
                hold = max(hold, n)
                break
    if text.endswith(REPLACEMENT):
        hold = max(hold, len(text) - len(text.rstrip(REPLACEMENT)))
    return hold


@dataclass
class DeltaStream:
    """Turns the growing text of one streamed completion into (reasoning, content) deltas.

    `feed(text, final)` takes the whole decoded text so far; it returns only what is new and safe to show:
    text that could still become a think tag or a stop string, or a character whose bytes are not all
    there, waits for the next feed. `final` flushes everything (cut at a stop string).
    """

    think_tags: tuple[str, str] | None
    in_think: bool
    stop: tuple[str, ...] = ()
    _sent_reasoning: str = ""
    _sent_content: str = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        text, stopped = cut_at_stop(text, self.stop)
        if not (final or stopped):
            markers = self.stop + (tuple(self.think_tags) if self.think_tags is not None else ())
            text = text[:len(text) - _held_back(text, markers)]
        reasoning, content = split_reasoning(text, self.think_tags, self.in_think)
        reasoning = reasoning or ""
        new_reasoning = reasoning[len(self._sent_reasoning):] if reasoning.startswith(self._sent_reasoning) else ""
        new_content = content[len(self._sent_content):] if content.startswith(self._sent_content) else ""
        self._sent_reasoning += new_reasoning
        self._sent_content += new_content
        return new_reasoning, new_content


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte (GPT-2's scheme: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for the characters 256, 257, ... in byte order), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_alphabet()


def token_bytes(tokenizer, token_ids: list[int]) -> list[bytes]:
    """The bytes each token stands for, even when it holds part of a multi-byte character (where decoding
    it alone gives U+FFFD): read off a byte-level BPE token or a <0xNN> byte-fallback token; otherwise its
    decoded text."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = "ByteLevel" in repr(decoder)  # once per call, not per token
    out = []
    for token_id, piece in zip(token_ids, tokenizer.convert_ids_to_tokens(list(token_ids))):
        if isinstance(piece, str) and byte_level and all(c in BYTE_LEVEL for c in piece):
            out.append(bytes(BYTE_LEVEL[c] for c in piece))
        elif isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(tokenizer.decode([token_id]).encode("utf-8"))
    return out
