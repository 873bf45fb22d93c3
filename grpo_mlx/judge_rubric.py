"""What the judge is asked and how its answers are read: the settings, the rubric template,
the pointwise and group requests, and the parsers of scores. Pure Python, no I/O but reading a
rubric file, no MLX.

The rubric is a template filled with str.format_map over plain field names only ({prompt},
{completion}, {answer}, any dataset column, {scale}; {completions} and {count} in group mode):
no attribute or index lookups, so a rubric reads no object's insides, and a field the data
lacks is one sentence naming it and the rubric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from grpo_mlx.errors import UserError

REASON_CHARS = 200  # a reason longer than this is cut: samples.jsonl holds a short one

DEFAULT_RUBRIC = (
    "You are grading a response to a prompt. Judge how well the response does what the prompt asks: "
    "correct, complete, clear and concise."
)


class JudgeError(UserError, RuntimeError):
    """The judge cannot be asked (bad settings, a server that does not answer)."""


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class JudgeSettings:
    model: str  # "base", an http(s) URL, or a local path / hub id
    rubric: str  # the template text
    rubric_source: str  # where it came from, for error messages: a file path or "judge_rubric"
    mode: str = "pointwise"
    scale: tuple[float, float] = (0.0, 10.0)
    max_tokens: int = 256
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 3
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0  # greedy by default: the same request gets the same judgment
    seed: int = 0

    @property
    def is_endpoint(self) -> bool:
        return self.model.startswith(("http://", "https://"))


def parse_scale(text: str) -> tuple[float, float] | None:
    """ "0-10" -> (0.0, 10.0); None when it is not LOW-HIGH with LOW < HIGH."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:-|\.\.|to)\s*(-?\d+(?:\.\d+)?)\s*", str(text))
    if not m or float(m[1]) >= float(m[2]):
        return None
    return float(m[1]), float(m[2])


def load_rubric(value: str | None) -> tuple[str, str]:
    """(template, source): one line naming an existing file is read; one ending in .txt or .md
    that names none is an error (a typo would otherwise become the rubric); else the text itself."""
    if not value:
        return DEFAULT_RUBRIC, "the default rubric"
    one_line = "\n" not in value
    path = Path(value).expanduser()
    try:
        is_file = one_line and path.is_file()
    except OSError:  # text too long to be a file name
        is_file = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as e:
            raise JudgeError(f"judge_rubric: cannot read the rubric file {value}: {e.strerror or e}") from None
    if one_line and path.suffix in (".txt", ".md"):
        raise JudgeError(f"judge_rubric: rubric file not found: {value}")
    return value, "judge_rubric"


# ------------------------------------------------------------------ what the judge is asked


class _Fields(dict):
    """Template fields that name the missing key in one sentence instead of a KeyError."""

    def __init__(self, values: dict, source: str):
        super().__init__(values)
        self.source = source

    def __missing__(self, key):
        known = ", ".join("{" + k + "}" for k in self)
        raise JudgeError(f"rubric {self.source}: no field {{{key}}} to fill in (fields: {known})")


def render(template: str, fields: dict, source: str) -> str:
    """str.format_map over the fields only: `{name}` is a field, `{{` and `}}` are braces;
    attribute and index lookups ({a.b}, {a[0]}) are refused, so a rubric reads no object's insides."""
    check_rubric(template, source)
    try:
        return template.format_map(_Fields({k: _text(v) for k, v in fields.items()}, source))
    except (ValueError, IndexError) as e:
        raise JudgeError(f"rubric {source}: {e} (write a literal brace as {{{{ or }}}})") from None


def check_rubric(template: str, source: str) -> None:
    """Refuse a template whose fields are not plain names ({a.b}, {a[0]}, {a!r}, {a:>5} too)."""
    for _, name, spec, conversion in _formatter_fields(template, source):
        if name is not None and (not re.fullmatch(r"\w+", name) or spec or conversion):
            raise JudgeError(f"rubric {source}: {{{name}}} is not a plain field name (use {{column}} only)")


def _formatter_fields(template: str, source: str):
    import string

    try:
        return list(string.Formatter().parse(template))
    except ValueError as e:
        raise JudgeError(f"rubric {source}: {e} (write a literal brace as {{{{ or }}}})") from None


def _uses(template: str, name: str) -> bool:
    return any(field == name for _, field, _, _ in _formatter_fields(template, "rubric"))


def rubric_columns(template: str) -> tuple[str, ...]:
    """The dataset columns a rubric reads (its fields other than the ones the judge fills in)."""
    own = {"prompt", "completion", "completions", "count", "scale"}
    names = [f for _, f, _, _ in _formatter_fields(template, "rubric") if f and f not in own]
    return tuple(dict.fromkeys(names))


def _text(value) -> str:
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):  # chat messages
        if len(value) == 1:
            return str(value[0]["content"])
        return "\n\n".join(f"{m.get('role', '')}: {m['content']}" for m in value)
    return "" if value is None else str(value)


def _scale_text(scale: tuple[float, float]) -> str:
    return "-".join(f"{x:g}" for x in scale)


def pointwise_messages(settings: JudgeSettings, fields: dict) -> list[dict]:
    """One user message: the rubric, then (unless the rubric places them itself with
    {completion}) the prompt and the response, then how to answer."""
    lo, hi = settings.scale
    fields = {**fields, "scale": _scale_text(settings.scale)}
    text = render(settings.rubric, fields, settings.rubric_source)
    if not _uses(settings.rubric, "completion"):
        text += (
            f"\n\n## Prompt\n{_text(fields['prompt'])}\n\n## Response\n{_text(fields['completion'])}\n\n"
            f"Give one short sentence of reasoning, then a last line `Score: N` with N from {lo:g} to {hi:g}."
        )
    return [{"role": "user", "content": text}]


def group_messages(settings: JudgeSettings, fields: dict, completions: list[str]) -> list[dict]:
    """One user message for a prompt's G completions, numbered from 1; the judge gives a line
    `N: score` for each (the rubric may place the list itself with {completions})."""
    lo, hi = settings.scale
    listing = "\n\n".join(f"### Response {i}\n{c}" for i, c in enumerate(completions, 1))
    # {completion} is empty here: a group has no single completion
    fields = {**fields, "completion": "", "completions": listing, "count": str(len(completions)),
              "scale": _scale_text(settings.scale)}  # fmt: skip
    text = render(settings.rubric, fields, settings.rubric_source)
    if not _uses(settings.rubric, "completions"):
        text += f"\n\n## Prompt\n{_text(fields['prompt'])}\n\n## {len(completions)} responses\n{listing}"
    text += (
        f"\n\nCompare the responses with each other. Answer with exactly {len(completions)} lines, one per "
        f"response in order, each `N: score - a short reason` with N the response number (1 to "
        f"{len(completions)}) and the score from {lo:g} to {hi:g}."
    )
    return [{"role": "user", "content": text}]


def repair_turn(messages: list[dict], answer: str, what: str) -> list[dict]:
    """The request asked again once: the unreadable answer and a note on the expected form."""
    note = f"Your answer could not be read: {what}. Answer again, in exactly the form asked for."
    return [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": note}]


# ------------------------------------------------------------------ reading the answers

NUMBER = r"[-+]?\d+(?:\.\d+)?"


def parse_score(text: str, scale: tuple[float, float]) -> tuple[float | None, str]:
    """(score on the scale or None, a short reason). The last `Score: N` wins; else the last
    number within the scale, where "7/10" and "7 out of 10" count as 7."""
    lo, hi = scale
    text = text or ""
    labelled = re.findall(rf"score\W{{0,3}}\s*({NUMBER})", text, re.IGNORECASE)
    plain = re.sub(rf"({NUMBER})\s*(?:/|out of)\s*{NUMBER}", r"\1", text)
    candidates = [float(x) for x in labelled] or [float(x) for x in re.findall(NUMBER, plain)]
    in_range = [x for x in candidates if lo <= x <= hi]
    score = in_range[-1] if in_range else None
    reason = re.sub(rf"(?i)\bscore\W{{0,3}}\s*{NUMBER}(?:\s*(?:/|out of)\s*{NUMBER})?", "", text).strip()
    return score, _short(reason)


def parse_group(text: str, scale: tuple[float, float], n: int) -> tuple[list[float] | None, list[str], str]:
    """(n scores or None, n reasons, what was wrong): lines `N: score - reason` for N = 1..n,
    each score within the scale; a missing, repeated-differently, extra or out-of-range one
    makes the whole answer unreadable (the scores are relative: half a ranking is not one)."""
    lo, hi = scale
    found: dict[int, tuple[float, str]] = {}
    pattern = rf"(?im)^\W*(?:response|completion|answer)?\s*#?(\d+)\s*[:=).\]-]\s*(?:score\W{{0,3}}\s*)?({NUMBER})(.*)$"
    for index, value, rest in re.findall(pattern, text or ""):
        i, v = int(index), float(value)
        if i in found and found[i][0] != v:
            return None, [""] * n, f"response {i} was scored twice"
        found[i] = (v, _short(rest.strip(" -:—\t")))
    if sorted(found) != list(range(1, n + 1)):
        missing = [i for i in range(1, n + 1) if i not in found]
        extra = [i for i in found if not 1 <= i <= n]
        what = f"no score for response {missing[0]}" if missing else f"a score for response {extra[0]} of {n}"
        return None, [""] * n, what
    bad = [i for i, (v, _) in found.items() if not lo <= v <= hi]
    if bad:
        return None, [""] * n, f"the score of response {bad[0]} is outside {lo:g} to {hi:g}"
    return [found[i][0] for i in range(1, n + 1)], [found[i][1] for i in range(1, n + 1)], ""


def normalise(score: float, scale: tuple[float, float]) -> float:
    lo, hi = scale
    return (score - lo) / (hi - lo)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"
