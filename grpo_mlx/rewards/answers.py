"""Answers in completion text: the text of a completion, the answer it gives (\\boxed{}, `####`,
<answer> tags, the last number) and whether two answers are the same (numbers, fractions, text).

`#### x` counts as an answer only when x is a number or ends the text (else it is a heading);
GSM8K's `#### 54 dollars` gives 54 (a number and at most two words of unit). Pure Python.
"""

from __future__ import annotations

import math
import re
from typing import Any


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, one message dict, or a list of messages (joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}]
            return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        return "" if content is None else str(content)
    if isinstance(completion, (list, tuple)):
        return "\n".join(completion_text(m) for m in completion)
    return "" if completion is None else str(completion)


def _last_boxed(text: str) -> str | None:
    # Braces nest (\boxed{\frac{1}{2}}), so a regex cannot find the end; count instead.
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced (truncated); try an earlier one
    return None


_HASHES = re.compile(r"####[ \t]*([^\n]*\S)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A minus sign only when it is not a hyphen between words/numbers ("3-4" ends in 4, not -4).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")


def _clean(answer: str) -> str:
    return answer.strip().strip("$").strip().rstrip(".").strip()


# GSM8K's "#### 54 dollars": a number, then at most two words of unit (a longer tail is a heading).
_NUMBER_AND_UNIT = re.compile(r"(\S*?\d[\d,./]*%?)\s+[^\W\d_]+(?:\s+[^\W\d_]+)?\.?")


def _hash_answer(found: str) -> str:
    """The answer in what follows `####`: its number when a unit follows it ("54 dollars")."""
    match = _NUMBER_AND_UNIT.fullmatch(found.strip())
    return match[1] if match and _to_number(match[1]) is not None else found


def _last_hashes(text: str) -> str | None:
    # "#### x" is also a markdown heading; trust it only if x is a number (with a unit) or ends the text.
    match = ([None] + list(_HASHES.finditer(text)))[-1]
    if match is None:
        return None
    answer = _hash_answer(match[1])
    if _to_number(answer) is not None or not text[match.end() :].strip():
        return answer
    return None


def extract_answer(text: str) -> str | None:
    """Final answer: last \\boxed{}, else `#### x`, else last <answer>, else the last number."""
    text = completion_text(text)
    for found in (
        _last_boxed(text),
        _last_hashes(text),
        (_ANSWER_TAG.findall(text) or [None])[-1],
        (_NUMBER.findall(text) or [None])[-1],
    ):
        if found is not None and _clean(found):
            return _clean(found)
    return None


_FRACTION = re.compile(r"(-?)\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}|(-?\d+)\s*/\s*(-?\d+)")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _to_number(s: str) -> float | None:
    s = _clean(s).replace("\\$", "").replace("$", "").replace("\\%", "").rstrip("%").strip()
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands commas only, not "1,2"
        s = s.replace(",", "")
    if _PLAIN_NUMBER.fullmatch(s):
        value = float(s)
        return value if math.isfinite(value) else None
    match = _FRACTION.fullmatch(s)
    if match:
        sign, num, den = match[1], match[2] or match[4], match[3] or match[5]
        if int(den) != 0:
            return (-1 if sign else 1) * int(num) / int(den)
    return None


def answers_match(predicted: str | None, reference: Any) -> bool:
    """Numeric equality (1e-6 relative) when both are numbers, else normalised string equality.
    A list of references means "any of these" (the data refuses objects as answers)."""
    if predicted is None or reference is None:
        return False
    if isinstance(reference, (list, tuple)):
        return any(answers_match(predicted, r) for r in reference)
    if isinstance(reference, dict):
        raise TypeError(f"an answer cannot be an object ({reference!r:.60}); give a string, number or list")
    reference = str(reference)
    if "####" in reference:  # a GSM8K solution: the answer follows the last ####
        hashes = _HASHES.findall(reference)
        reference = _hash_answer(hashes[-1]) if hashes else reference
    a, b = _to_number(str(predicted)), _to_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    normalise = lambda s: " ".join(_clean(s).lower().split())  # noqa: E731
    return normalise(str(predicted)) == normalise(reference)
