"""LYNX cue events: where in a response the exit probe is consulted.

A cue event is the index of the generated token that **completes** a cue string (LYNX, arXiv
2512.05325, reference code ``farukakgul/LYNX``: "hmm", "wait", "alternatively"). Cues are found
on text, not on token ids, so a cue split across tokens ("wa" + "it") completes at the token
holding its last character. Both the offline scan (data collection) and the online decoder use the
same two pieces, so they agree on every event:

* :class:`IncrementalDetokenizer`: per-token text deltas from a growing list of ids, decoded in
  context (a SentencePiece leading space or a multi-byte character split over two tokens comes out
  right; a token whose bytes are incomplete yields "" and the text appears with a later token).
* :class:`CueDetector`: fed one delta per token, says whether a cue completed in it, and stops
  (for good) once a region-end marker appears: ``"</think>"`` for thinking models, the start of
  the answer (``"\\boxed"``, ``"final answer"``) for models without a thinking block.

Matching is case-insensitive. With ``word_boundary`` (default; the reference has none, so its
"wait" also fires inside "awaiting") a cue that starts with a letter/digit must not follow one, and
one that ends with a letter/digit must not be followed by one, where a run of the cue's last
character is allowed ("hmmm"). The right side is only checked when the next character is already
known: a cue ending exactly at a token's end fires at once (the decision cannot wait for the next
token), so "wait" + "ing" fires while the single token "waiting" does not.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

WORD_CUES = ("hmm", "wait", "alternatively")
LINEBREAK_CUES = ("\n",)
THINK_END = ("</think>",)
ANSWER_START = ("\\boxed", "final answer")
EXIT_STRING_THINKING = "</think> Final Answer: \\boxed{"
EXIT_STRING_PLAIN = "\nFinal Answer: \\boxed{"


class CueConfigError(ValueError):
    """Bad cue settings; the message names what to fix."""


@dataclass(frozen=True)
class CueConfig:
    """Which strings are cues and where the region that may hold them ends.

    ``region_end``: markers after which no cue counts (the first occurrence ends the region);
    empty means the whole response counts.
    """

    cues: tuple[str, ...] = WORD_CUES
    word_boundary: bool = True
    region_end: tuple[str, ...] = THINK_END

    def __post_init__(self):
        cues = tuple(self.cues) if not isinstance(self.cues, str) else (self.cues,)
        if not cues or any(not isinstance(c, str) or not c for c in cues):
            raise CueConfigError(f"cue strings must be a non-empty list of non-empty strings, got {self.cues!r}")
        region_end = (self.region_end,) if isinstance(self.region_end, str) else tuple(self.region_end or ())
        if any(not m for m in region_end):
            raise CueConfigError("region_end markers must be non-empty strings")
        object.__setattr__(self, "cues", cues)
        object.__setattr__(self, "region_end", region_end)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "CueConfig":
        return cls(cues=tuple(data["cues"]), word_boundary=bool(data.get("word_boundary", True)),
                   region_end=tuple(data.get("region_end", ())))


def cue_preset(name: str, thinking: bool) -> CueConfig:
    """``"words"`` (hmm / wait / alternatively) or ``"linebreak"`` (every line break is a cue:
    for models that never say the cue words, such as SmolLM2-135M). The region ends at
    ``</think>`` for thinking models, at the start of the answer otherwise."""
    region = THINK_END if thinking else ANSWER_START
    if name == "words":
        return CueConfig(WORD_CUES, True, region)
    if name == "linebreak":
        return CueConfig(LINEBREAK_CUES, False, region)
    raise CueConfigError(f"unknown cue preset '{name}'; use 'words' or 'linebreak'")


def has_thinking_block(tokenizer) -> bool:
    """True when the tokenizer knows ``</think>`` as one token or its chat template mentions it."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return "</think>" in vocab or "</think>" in (getattr(tokenizer, "chat_template", None) or "")


def default_exit_string(thinking: bool) -> str:
    """``</think> Final Answer: \\boxed{`` (reference) or ``\\nFinal Answer: \\boxed{`` without a thinking block."""
    return EXIT_STRING_THINKING if thinking else EXIT_STRING_PLAIN


class IncrementalDetokenizer:
    """Text added by each new token, decoded in context (the streaming-detokenizer scheme:
    decode a short window of recent ids with and without the new ones, emit the difference)."""

    def __init__(self, tokenizer, window: int = 6):
        self.tokenizer = tokenizer
        self.window = window
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # ids before this one have been emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while bytes are incomplete)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.prefix_offset, self.read_offset - self.window)
        return delta


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


class CueDetector:
    """Feed per-token text deltas; ``push`` returns True when a cue completes in that token.

    Inactive for good once a ``region_end`` marker has appeared (a cue ending before the marker in
    the same token still counts). Keeps only a short tail of the text, O(1) per token.
    """

    def __init__(self, config: CueConfig | None = None):
        self.config = config or CueConfig()
        self.cues = tuple(c.lower() for c in self.config.cues)
        self.markers = tuple(m.lower() for m in self.config.region_end)
        self.active = True
        self.tail = ""  # last characters seen (lower case)
        self._keep = max(len(s) for s in self.cues + self.markers) + 1
        self.num_tokens = 0

    def _left_ok(self, text: str, start: int, cue: str) -> bool:
        if not self.config.word_boundary or not _is_word(cue[0]) or start == 0:
            return True
        return not _is_word(text[start - 1])

    def _right_ok(self, text: str, end: int, cue: str) -> bool:
        if not self.config.word_boundary or not _is_word(cue[-1]):
            return True
        while end < len(text) and text[end] == cue[-1]:
            end += 1
        return end == len(text) or not _is_word(text[end])

    def push(self, delta: str) -> bool:
        """Process the text of one token; True iff a cue completes inside it (and in the region)."""
        self.num_tokens += 1
        if not self.active or not delta:
            return False
        old = len(self.tail)
        text = self.tail + delta.lower()
        limit = len(text)
        for marker in self.markers:
            pos = text.find(marker, max(0, old - len(marker) + 1))
            if pos >= 0:
                self.active = False
                limit = min(limit, pos)
        hit = False
        for cue in self.cues:
            start = text.find(cue, max(0, old - len(cue) + 1))
            while start >= 0 and not hit:
                end = start + len(cue)
                if end > limit:
                    break
                if end > old and self._left_ok(text, start, cue) and self._right_ok(text, end, cue):
                    hit = True
                start = text.find(cue, start + 1)
            if hit:
                break
        # keep enough tail for cues/markers spanning tokens and one boundary character before them
        self.tail = text[-(self._keep + 1):] if self.active else ""
        return hit


def cue_events_from_texts(token_texts, config: CueConfig | None = None) -> list[int]:
    """Indices of the tokens (given as their text deltas) in which a cue completes."""
    detector = CueDetector(config)
    return [i for i, t in enumerate(token_texts) if detector.push(t)]


def find_cue_events(tokenizer, response_ids, config: CueConfig | None = None) -> list[int]:
    """Cue events of a generated response (ids after the prompt, padding removed): the same
    detokenizer + detector the online decoder runs, so offline and online events agree."""
    detok = IncrementalDetokenizer(tokenizer)
    return cue_events_from_texts((detok.push(int(t)) for t in response_ids), config)


__all__ = [
    "ANSWER_START", "CueConfig", "CueConfigError", "CueDetector", "EXIT_STRING_PLAIN",
    "EXIT_STRING_THINKING", "IncrementalDetokenizer", "LINEBREAK_CUES", "THINK_END", "WORD_CUES",
    "cue_events_from_texts", "cue_preset", "default_exit_string", "find_cue_events",
    "has_thinking_block",
]
