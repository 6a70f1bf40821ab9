"""Final-answer checking built on ``math_verify`` (parse + verify).

Decisions:

* The completion's answer is the content of its LAST ``\\boxed{...}`` (or ``\\fbox{...}``).
  With ``require_boxed=True`` (default; our prompts ask for ``\\boxed{}``) a completion
  without one is wrong. With ``require_boxed=False`` the last 1,000 characters go to
  math_verify's own extraction (answer phrases such as "the final answer is", else the
  last expression it finds).
* Gold answers are wrapped in ``\\boxed{}`` before parsing, so "72", "-3", "0.5", "1/2",
  "\\frac{1}{2}" all parse. Thousands separators are accepted on both sides: "1,000",
  "1{,}000" and "1\\,000" all equal 1000 ("1,5" is still the set {1, 5}). If the gold
  answer does not parse at all, an exact (whitespace-insensitive) string match is used.
* math_verify's timeouts use ``signal.alarm``, which only works in the main thread, so they
  are disabled. Instead, predictions holding huge numeric powers or factorials (e.g.
  ``9^{9^{9^{9}}}``, ``(10^{100})!``) that would make sympy run for minutes are rejected
  (counted wrong) before comparison, and boxed answers over 1,000 characters are wrong.
* A numeric gold answer ("72", "-3", "0.5") needs a final value: a boxed answer that still
  holds an arithmetic operation on numbers ("2 + 4", "7 \\times 8", "2^{10}", "3 + 4 = 7") is
  wrong even though sympy would evaluate it to the gold value. Without this rule a policy learns
  to copy the question's expression into the box (observed in RL on the arithmetic task).
  Fractions ("3/4", "\\frac{3}{4}") are final values and stay allowed.
* ``is_correct`` never raises: any error counts as wrong.
"""

from __future__ import annotations

import functools
import logging
import math
import re

import sympy
from math_verify import parse, verify

# We disable math-verify's signal timeouts on purpose (they fail outside the main thread) and
# bound the work ourselves; silence its one-time warning about that.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).setLevel(logging.ERROR)
from sympy.functions.combinatorial.factorials import CombinatorialFunction

__all__ = ["extract_boxed", "is_correct"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MAX_ANSWER_CHARS = 1000  # longer boxed answers count as wrong
_UNBOXED_TAIL_CHARS = 1000  # require_boxed=False: only the tail is searched
_MAX_BITS = 4_000_000  # refuse predictions whose numeric value may need more bits
_TOKEN_RE = re.compile(r"\\.|[{}]", re.S)  # an escape pair, or a brace
_NUMERIC_GOLD_RE = re.compile(r"^\s*\$?\s*[-+]?\d[\d,]*(?:\.\d+)?\s*\$?\s*$")
# A binary operation between numbers (or bracketed/braced operands): +, -, *, x, ÷, ^, =, \times ...
_UNEVALUATED_RE = re.compile(r"[\d)}]\s*(?:[-+*×÷^=]|\\times|\\cdot|\\div|\\ast)\s*[-+]?[\d({\\]")
_THIN_SEP_RE = re.compile(r"(?<=\d)(?:\{,\}|\\,|\\ |\\;|\\!)(?=\d{3}(?!\d))")


def _box_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every balanced ``\\boxed{...}``/``\\fbox{...}`` content, by start.

    One pass over braces from the first box; ``\\{`` and ``\\}`` are literal, not grouping.
    """
    openers = {m.end() - 1 for m in _BOX_RE.finditer(text)}
    if not openers:
        return []
    spans, stack = [], []
    for tok in _TOKEN_RE.finditer(text, min(openers)):
        if tok.group() == "{":
            stack.append(tok.start())
        elif tok.group() == "}" and stack:
            start = stack.pop()
            if start in openers:
                spans.append((start + 1, tok.start()))
    return sorted(spans)


def extract_boxed(text: str) -> str | None:
    """Stripped content of the last complete ``\\boxed{...}`` or ``\\fbox{...}``; None if absent."""
    if not isinstance(text, str):
        return None
    spans = _box_spans(text)
    if not spans:
        return None
    start, end = spans[-1]
    return text[start:end].strip()


def _normalise(answer: str) -> str:
    """Drop LaTeX thousands separators ("1{,}000", "1\\,000") that math_verify misreads."""
    return _THIN_SEP_RE.sub("", answer.strip())


@functools.lru_cache(maxsize=16384)
def _parse_gold(gold: str) -> tuple:
    """Parsed gold answer (cached per string)."""
    text = gold.strip()
    if "\\boxed" not in text and "\\fbox" not in text:
        if len(text) > 1 and text[0] == text[-1] == "$":  # "$...$" -> "..."
            text = text.strip("$")
        text = "\\boxed{" + _normalise(text) + "}"
    return tuple(parse(text, parsing_timeout=None))


@functools.lru_cache(maxsize=16384)
def _parse_answer(answer: str) -> tuple:
    """Parsed boxed answer content (cached: a group often repeats the same answer)."""
    return tuple(parse("\\boxed{" + _normalise(answer) + "}", parsing_timeout=None))


def _log2_size(expr) -> float:
    """Rough upper bound on log2 |value| of a sympy expression (inf: too big to evaluate)."""
    if isinstance(expr, sympy.Rational):  # Integer included; exact, no float overflow
        return float(max(abs(expr.p).bit_length() - expr.q.bit_length() + 1, 0))
    if not expr.args:
        try:
            value = abs(complex(expr))
        except (TypeError, ValueError):
            return 0.0  # symbols, booleans, infinities: no size concern
        return math.log2(value) if value > 1 else 0.0
    sizes = [_log2_size(a) for a in expr.args]
    if isinstance(expr, sympy.Pow):
        base, exp = sizes
        if math.isinf(base) or exp > 64:
            return math.inf
        if expr.args[1].free_symbols:
            return base
        return base * max(abs(complex(expr.args[1].evalf(15))), 1.0)
    if isinstance(expr, CombinatorialFunction):  # n! < n**n
        largest = max(sizes)
        return math.inf if largest > 64 else 2.0**largest * max(largest, 1.0)
    return sum(sizes)


def _too_big(parsed: tuple) -> bool:
    """True if a parsed expression is a numeric monster (power towers, huge factorials)."""
    try:
        return any(
            _log2_size(item) > _MAX_BITS for item in parsed if isinstance(item, sympy.Basic)
        )
    except Exception:  # overflow, recursion, ...: treat as too big
        return True


def is_correct(completion: str, gold: str, require_boxed: bool = True) -> bool:
    """True iff the completion's final answer equals ``gold`` per math_verify; never raises.

    The answer is the last ``\\boxed{}``; without one the result is False when
    ``require_boxed`` (default) and math_verify's own extraction on the completion's last
    1,000 characters otherwise. Safe to call from any thread (no signal-based timeouts).
    """
    try:
        if not isinstance(completion, str) or gold is None:
            return False
        gold = str(gold)
        answer = extract_boxed(completion)
        if answer is not None:
            if not answer or len(answer) > _MAX_ANSWER_CHARS:
                return False
            if _NUMERIC_GOLD_RE.match(gold) and _UNEVALUATED_RE.search(_normalise(answer)):
                return False
            pred = _parse_answer(answer)
        elif require_boxed:
            return False
        else:
            pred = tuple(parse(completion[-_UNBOXED_TAIL_CHARS:], parsing_timeout=None))
        gold_parsed = _parse_gold(gold)
        if not gold_parsed:  # unparseable gold: fall back to exact text
            return answer is not None and "".join(answer.split()) == "".join(gold.split())
        if not pred or _too_big(pred):
            return False
        return bool(verify(list(gold_parsed), list(pred), timeout_seconds=None))
    except Exception:
        return False
