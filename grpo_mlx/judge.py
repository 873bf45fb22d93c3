"""A language model as the judge: the built-in `judge` reward.

The judge is asked with a rubric rendered through a small template ({prompt}, {completion},
{answer} and any dataset column), and either scores each completion on its own (`pointwise`)
or sees all completions of a prompt at once and scores each (`group`, RULER-style: relative
judgments are steadier than absolute ones, and the advantages are relative anyway). Scores on
the stated scale are normalised to [0, 1]. An answer that cannot be read is asked again once
(with a note saying what was wrong), then scored None: "not applicable", never a silent 0.

Who judges (`judge_model`): an http(s) URL of an OpenAI-compatible server, `base` (the policy's
own model with its adapters off: no extra weights, but the policy learns to please its own
base), or a local mlx-lm model (grpo_mlx.judge_backends). Identical requests are answered from
a cache kept for the run, in memory and in the run directory (judge_cache.jsonl), so a resumed
run does not ask again. What it reports: `judge/unparseable` (share of completions whose
judgment could not be read), `judge/cache_hits` (requests answered from the cache) and
`time/judge` (seconds spent judging) with log_metric; the score and the reason beside each
completion with log_extra (`judge_score`, `judge_reason`), so samples.jsonl and the TUI show them.

No MLX at import: the config and the TUI import this module's settings cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from grpo_mlx import metric_names as M
from grpo_mlx.judge_rubric import (
    JudgeError,
    JudgeSettings,
    check_rubric,
    group_messages,
    load_rubric,
    normalise,
    parse_group,
    parse_scale,
    parse_score,
    pointwise_messages,
    repair_turn,
    rubric_columns,
)
from grpo_mlx.rewards.answers import completion_text

__all__ = ["CACHE_FILE", "Judge", "JudgeCache", "JudgeError", "JudgeReward", "JudgeSettings", "bind_judges"]

CACHE_FILE = "judge_cache.jsonl"


def settings_from(cfg) -> JudgeSettings:
    """The judge's settings from a TrainConfig (validated there)."""
    rubric, source = load_rubric(cfg.judge_rubric)
    check_rubric(rubric, source)  # before any model loads
    return JudgeSettings(
        model=cfg.judge_model,
        rubric=rubric,
        rubric_source=source,
        mode=cfg.judge_mode,
        scale=parse_scale(cfg.judge_scale),
        max_tokens=cfg.judge_max_tokens,
        concurrency=cfg.judge_concurrency,
        timeout=cfg.judge_timeout,
        retries=cfg.judge_retries,
        api_key_env=cfg.judge_api_key_env,
        temperature=cfg.judge_temperature,
        seed=cfg.seed,
    )


# ------------------------------------------------------------------ the cache


def request_key(backend_id: str, messages: list[dict], params: dict) -> str:
    blob = json.dumps({"backend": backend_id, "messages": messages, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class JudgeCache:
    """Answers by request key, for the run; with a path, each new answer is appended as one
    JSON line (a single write of a whole line: a crash leaves at most a torn last line, which
    loading skips) and the file is read back on resume."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self.answers: dict[str, str] = {}
        self.hits = 0
        self._lock = threading.Lock()  # endpoint answers arrive from worker threads
        if self.path and self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    self.answers[row["key"]] = row["answer"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted write

    def get(self, key: str) -> str | None:
        with self._lock:
            answer = self.answers.get(key)
            self.hits += answer is not None
            return answer

    def put(self, key: str, answer: str) -> None:
        with self._lock:
            if key in self.answers:
                return
            self.answers[key] = answer
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                line = json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n"
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode("utf-8"))  # O_APPEND: one write lands whole at the end
                finally:
                    os.close(fd)


# ------------------------------------------------------------------ the judge


@dataclass
class Verdicts:
    scores: list  # (N,) normalised score in [0, 1] or None
    raw: list  # (N,) the score on the judge's scale or None
    reasons: list  # (N,) short reason ("" when none)
    unparseable: int  # completions whose judgment could not be read
    requests: int  # requests sent or answered from the cache
    cache_hits: int
    seconds: float


class Judge:
    """Builds the requests of a batch, asks the backend (through the cache), reads the answers.

    A backend has `id` (part of the cache key) and `complete(list of message lists, params)
    -> list of answer texts`; a failure it cannot recover from raises (JudgeError)."""

    def __init__(self, settings: JudgeSettings, backend, cache: JudgeCache | None = None, group_size: int = 0):
        self.settings = settings
        self.backend = backend
        self.cache = cache or JudgeCache()
        self.group_size = group_size  # split runs of one prompt into groups of at most this many

    @property
    def params(self) -> dict:
        s = self.settings
        return {"max_tokens": s.max_tokens, "temperature": s.temperature, "seed": s.seed}

    def ask(self, requests: list[list[dict]]) -> list[str]:
        """Answers of the requests, from the cache where it has them."""
        keys = [request_key(self.backend.id, m, self.params) for m in requests]
        answers = [self.cache.get(k) for k in keys]
        todo = list({keys[i]: i for i, a in enumerate(answers) if a is None}.values())  # each distinct one once
        if todo:
            fresh = self.backend.complete([requests[i] for i in todo], self.params)
            for i, answer in zip(todo, fresh, strict=True):
                self.cache.put(keys[i], answer)
            answers = [a if a is not None else self.cache.answers[k] for a, k in zip(answers, keys)]
        return answers

    def judge(self, prompts: list, completions: list, columns: dict[str, list]) -> Verdicts:
        t0, hits0 = time.perf_counter(), self.cache.hits
        n = len(completions)
        texts = [completion_text(c) for c in completions]
        fields = [
            {**{k: v[i] for k, v in columns.items()}, "prompt": prompts[i], "completion": texts[i]} for i in range(n)
        ]
        raw: list = [None] * n
        reasons = [""] * n
        if self.settings.mode == "group":
            groups = self._groups(prompts)
            requests = [group_messages(self.settings, fields[g[0]], [texts[i] for i in g]) for g in groups]
            read = lambda answer, g: parse_group(answer, self.settings.scale, len(g))  # noqa: E731
        else:
            groups = [[i] for i in range(n)]
            requests = [pointwise_messages(self.settings, fields[i]) for i in range(n)]
            read = lambda answer, g: _pointwise_read(answer, self.settings.scale)  # noqa: E731
        answers = self.ask(requests)
        parsed = [read(a, g) for a, g in zip(answers, groups)]
        again = [j for j, (scores, _, _) in enumerate(parsed) if scores is None]
        if again:  # one more try, saying what was wrong
            retry = [repair_turn(requests[j], answers[j], parsed[j][2]) for j in again]
            for j, answer in zip(again, self.ask(retry)):
                parsed[j] = read(answer, groups[j])
        for g, (scores, why, _) in zip(groups, parsed):
            for k, i in enumerate(g):
                raw[i] = None if scores is None else scores[k]
                reasons[i] = why[k] if scores is not None else "unreadable judgment"
        unparseable = sum(len(g) for g, (s, _, _) in zip(groups, parsed) if s is None)
        scores = [None if r is None else normalise(r, self.settings.scale) for r in raw]
        total = len(requests) + len(again)
        return Verdicts(scores, raw, reasons, unparseable, total, self.cache.hits - hits0, time.perf_counter() - t0)

    def _groups(self, prompts: list) -> list[list[int]]:
        """Rows of one prompt next to each other form a group (at most group_size of them)."""
        groups: list[list[int]] = []
        for i, p in enumerate(prompts):
            if groups and prompts[groups[-1][0]] == p and (not self.group_size or len(groups[-1]) < self.group_size):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups


def _pointwise_read(answer: str, scale) -> tuple[list | None, list[str], str]:
    score, reason = parse_score(answer, scale)
    what = f"no score from {scale[0]:g} to {scale[1]:g} in it (end with a line `Score: N`)"
    return (None, [reason], what) if score is None else ([score], [reason], "")


def report(verdicts: Verdicts, log_metric, log_extra) -> list:
    """Hand the verdicts to the trainer: the metrics, the samples' columns, the rewards."""
    n = len(verdicts.scores)
    if log_metric is not None:
        log_metric(M.JUDGE_UNPARSEABLE, verdicts.unparseable / n if n else 0.0)
        log_metric(M.JUDGE_CACHE_HITS, float(verdicts.cache_hits))
        log_metric(M.JUDGE_TIME, verdicts.seconds)
    if log_extra is not None:
        log_extra("judge_score", verdicts.raw)
        log_extra("judge_reason", verdicts.reasons)
    return verdicts.scores


# ------------------------------------------------------------------ the reward


class JudgeReward:
    """The `judge` reward: sync, called in the trainer's thread (a local or `base` judge runs
    MLX, whose streams belong to the thread that built the model). Bound to its backend by
    bind_judges once the policy is loaded."""

    __name__ = "judge"
    in_trainer_thread = True  # scoring calls it directly: MLX work stays in the trainer's thread

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.judge: Judge | None = None

    def _checked(self) -> Judge:
        if self.judge is None:
            raise JudgeError("the judge reward was not set up with a model (bind_judges was not called)")
        return self.judge

    def __call__(self, prompts, completions, log_metric=None, log_extra=None, **columns):
        columns = {k: v for k, v in columns.items() if isinstance(v, list) and k != "completion_ids"}
        return report(self._checked().judge(prompts, completions, columns), log_metric, log_extra)


class EndpointJudgeReward(JudgeReward):
    """The `judge` reward asking a server: `async def`, so it runs alongside other async
    rewards; its own requests are concurrent in the backend (bounded by judge_concurrency)."""

    in_trainer_thread = False

    async def __call__(self, prompts, completions, log_metric=None, log_extra=None, **columns):
        import asyncio

        columns = {k: v for k, v in columns.items() if isinstance(v, list) and k != "completion_ids"}
        verdicts = await asyncio.to_thread(self._checked().judge, prompts, completions, columns)
        return report(verdicts, log_metric, log_extra)


def judge_reward(config=None, **_):
    """The built-in `judge` reward factory: needs the run's TrainConfig (judge_* keys)."""
    from grpo_mlx.rewards.errors import RewardSpecError

    if config is None or not getattr(config, "judge_model", None):
        raise RewardSpecError(
            "reward 'judge' needs a judge: set judge_model (a local model, base, or an http(s) URL) in a "
            "training run (grpo-mlx eval cannot use the judge reward)"
        )
    settings = settings_from(config)
    reward = (EndpointJudgeReward if settings.is_endpoint else JudgeReward)(settings)
    reward.needs_columns = rubric_columns(settings.rubric)  # check_columns refuses data without them
    if settings.is_endpoint:  # a server needs no model: ready now
        from grpo_mlx.judge_backends import EndpointBackend

        reward.judge = Judge(settings, EndpointBackend(settings), group_size=config.group_size)
    return reward


def probe_endpoints(reward_fns: list) -> None:
    """Check that every judge server of the run can be reached (a JudgeError naming it if not)."""
    for _, fn in reward_fns:
        if isinstance(fn, JudgeReward) and fn.settings.is_endpoint and fn.judge is not None:
            fn.judge.backend.probe()


def needs_model(fn) -> bool:
    """A judge reward that waits for a model (a local or `base` judge): it cannot score before one loads."""
    return isinstance(fn, JudgeReward) and fn.judge is None


def bind_judges(reward_fns: list, model, tokenizer, run_dir, group_size: int = 0) -> None:
    """Give each `judge` reward its backend (the policy for `base`, a loaded model for a local
    judge) and the run directory's cache (read back when resuming). Call once the policy is loaded."""
    from grpo_mlx import judge_backends

    for _, fn in reward_fns:
        if not isinstance(fn, JudgeReward):
            continue
        s = fn.settings
        if s.is_endpoint:
            backend = fn.judge.backend
        elif s.model == "base":
            backend = judge_backends.LocalBackend(model, tokenizer, "base", s, base=True)
        else:
            from grpo_mlx.policy import load_model, prepare_for_cpu

            judge_model, judge_tokenizer = load_model(s.model)
            prepare_for_cpu(judge_model)
            backend = judge_backends.LocalBackend(judge_model, judge_tokenizer, s.model, s)
        cache = JudgeCache(Path(run_dir) / CACHE_FILE if run_dir else None)
        fn.judge = Judge(s, backend, cache, group_size=group_size)
