"""Multi-turn episodes: the model calls tools, reads their results, and goes on, B*G rows at once.

One episode per row (row b*G + g is episode g of prompt b). Turns are batched:
- Decode: every row still in its turn samples one token per step (the sampler's pickers), until
  each has ended the turn: EOS, the tool-call end marker, or the completion budget. A row that
  ended stays in the batch (its later cache entries are ignored) until a quarter have ended,
  then the batch is filtered, as in grpo_mlx.sampler.
- Boundary: the calls of every row that ended with one are parsed by the tokenizer's tool
  parser (mlx-lm's, so each model family's format), run together (grpo_mlx.tools), and their
  results rendered by the chat template as `tool` messages. Only the text after the model's own
  turn is appended (the template is checked once to render the earlier conversation as a
  prefix). The continuing rows' caches keep every entry they hold; the batch cache is rebuilt
  from them (mlx-lm's BatchKVCache.merge) and only the appended tokens are prefilled, in one
  right-padded forward (BatchKVCache.prepare / finalize turn the right padding into left).
- Rows end independently: EOS without a call, `max_turns` turns with calls, or the budget
  (tokens of every turn and result together, max_completion_length).
The episode is the completion: model tokens and appended tokens in order; `env_mask` marks the
appended ones, which the loss, the KL and the log-probs never use (their log-probs are 0 here).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from grpo_mlx.errors import UserError
from grpo_mlx.sampler import (
    COMPACT_FRACTION,
    HOST_SAMPLING_MIN_VOCAB,
    Rollout,
    _is_filtered,
    decode_text,
    host_pick,
    make_device_picker,
    pad_id,
    prefill_groups,
)
from grpo_mlx.tools import Toolbox, environment_tools, parse_calls, resolve_environment, run_calls, tool_schema

SENTINEL = "Zq7Xw"  # the dummy assistant text whose end marks where the model's own turn ends
DUMMY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]


class TemplateError(UserError, ValueError):
    """The chat template cannot append tool results after the model's turn."""


# ------------------------------------------------------------------ rendering tool results


class ResultRenderer:
    """The text the chat template writes after an assistant turn for its tool results (up to
    the next assistant generation prompt), as the suffix of a dummy conversation."""

    def __init__(self, tokenizer, schemas: list[dict]):
        self.tokenizer, self.schemas = tokenizer, schemas
        base = self._render(DUMMY, generation=False)
        cut = base.rfind(SENTINEL)
        if cut < 0:
            raise TemplateError("the chat template drops the assistant's text; tool results cannot follow it")
        self.prefix = base[: cut + len(SENTINEL)]
        eos = sorted(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.eos_texts = {i: tokenizer.decode([i]) for i in eos}

    def _render(self, messages, generation: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=self.schemas or None, add_generation_prompt=generation, tokenize=False
            )
        except Exception as e:
            raise TemplateError(f"the chat template cannot render tool messages: {type(e).__name__}: {e}") from None

    def suffix(self, results: list[tuple[str, str]], ended_with: int | None = None) -> str:
        """The text after the model's turn: results are (tool name, content); `ended_with` the
        turn's last token (an EOS the template writes itself is not written twice)."""
        tools = [{"role": "tool", "name": name, "content": content} for name, content in results]
        full = self._render(DUMMY + tools, generation=True)
        if not full.startswith(self.prefix):
            raise TemplateError(
                "the chat template does not render the conversation before a tool result as a prefix of the "
                "conversation with it, so the result cannot be appended to the episode"
            )
        text = full[len(self.prefix) :]
        eos_text = self.eos_texts.get(ended_with, "")
        if eos_text and text.startswith(eos_text):
            text = text[len(eos_text) :]
        return text


# ------------------------------------------------------------------ the episodes


@dataclass
class EpisodeStats:
    """Per row: turns taken, calls made, calls that failed, cut at max_turns."""

    turns: np.ndarray  # (N,) int, model turns (1 for an episode without calls)
    calls: np.ndarray  # (N,) int
    errors: np.ndarray  # (N,) int
    cut_at_turns: np.ndarray  # (N,) bool
    prefill_tokens: int = 0  # tokens prefilled at turn boundaries (appended tokens only)
    boundaries: int = 0  # turn boundaries the batch went through
    boundary_time: float = 0.0  # seconds at boundaries: tools, rendering, cache rebuild, prefill
    log: list = field(default_factory=list)  # (N,) per row: the turns as dicts, for samples


def generate_episodes(
    model,
    tokenizer,
    prompts: list[list[int]],
    group_size: int,
    max_tokens: int,
    toolbox: Toolbox | list[Toolbox],
    renderer: ResultRenderer,
    max_turns: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    host_sampling: bool | None = None,
    seeds: list[int] | None = None,
    force=None,
) -> tuple[Rollout, EpisodeStats]:
    """B*G episodes of at most `max_tokens` completion tokens (model and tool results) and at
    most `max_turns` turns with tool calls (`toolbox`: one for all, or one per episode, whose
    environment's methods it holds). Returns the Rollout (env_mask on the appended tokens)
    and each row's EpisodeStats. `force(episodes (n,), positions (n,)) -> (n,)` scripts the
    policy (tests, demos): a token id >= 0 replaces the sampled one (with its log-probability
    under the model), -1 keeps it."""
    if not getattr(tokenizer, "has_tool_calling", False):
        raise TemplateError(
            "the tokenizer has no tool-call format (mlx-lm infers one from the chat template, or reads "
            "tool_parser_type from tokenizer_config.json); tools need a model whose template supports them"
        )
    t0 = time.perf_counter()
    cache = prefill_groups(model, prompts, group_size)
    if not all(hasattr(c, "prepare") and hasattr(c, "left_padding") for c in cache):
        raise UserError("multi-turn episodes need a model with plain attention caches (this one has other caches)")
    ep = _Episodes(tokenizer, prompts, group_size, max_tokens, max_turns)
    pick = _Picker(temperature, top_p, top_k, min_p, host_sampling, force)
    if seeds is not None and temperature > 0:  # keyed by (prompt, position), as the sampler does
        pick.uniforms = np.concatenate(
            [np.asarray(mx.random.uniform(shape=(group_size, max_tokens), key=mx.random.key(int(s)))) for s in seeds]
        )
    from grpo_mlx.logprobs import lm_head_split

    split = lm_head_split(model)
    body = split[0] if split else model
    rows = np.arange(ep.n)  # (n,) the episode of each batch row
    y = mx.array([p[-1] for p in prompts for _ in range(group_size)], dtype=mx.int32)  # (n,)
    while True:
        phase_rows = list(rows)
        cache, rows, y, spans = ep.decode_turns(model, cache, rows, y, pick)
        tb = time.perf_counter()
        calls_of = ep.end_turns(phase_rows, renderer)
        box = toolbox if isinstance(toolbox, list) else [toolbox] * ep.n
        feeds = ep.append_results(calls_of, run_calls([(box[r], c) for r in calls_of for c in calls_of[r]]), renderer)
        if feeds:
            spans.update(_spans(cache, rows, [b for b, r in enumerate(rows) if r in feeds and r not in spans],
                                ep.cached))  # fmt: skip
            cache, rows, y = _continue(body, spans, ep.cached, feeds)
            ep.stats.prefill_tokens += sum(len(f) - 1 for f in feeds.values())
            ep.stats.boundaries += 1
        if calls_of:
            ep.stats.boundary_time += time.perf_counter() - tb
        if not feeds:
            break
    roll = ep.rollout(sum(map(len, prompts)))
    roll.decode_steps, roll.decode_time = pick.steps, time.perf_counter() - t0
    return roll, ep.stats


class _Picker:
    """The sampler's token pickers (numpy or MLX, as grpo_mlx.sampler chooses), keyed random
    numbers, and the scripted policy's override."""

    def __init__(self, temperature, top_p, top_k, min_p, host_sampling, force):
        self.temperature, self.filters, self.host, self.force = temperature, (top_p, top_k, min_p), host_sampling, force
        self.uniforms, self.device_pick, self.steps = None, None, 0

    def __call__(self, logits, rows, pos):
        self.steps += 1
        t = self.temperature
        if self.host is None:
            self.host = (
                mx.default_device() == mx.cpu
                and logits.shape[-1] >= HOST_SAMPLING_MIN_VOCAB
                and not _is_filtered(t, *self.filters)
            )
        u = None if self.uniforms is None else self.uniforms[rows, pos]  # (n,)
        if self.host:
            tok, lp, ent = host_pick(logits, t, u)
        else:
            top_p, top_k, min_p = self.filters
            self.device_pick = self.device_pick or make_device_picker(t, top_p, top_k, min_p, keyed=u is not None)
            out = self.device_pick(logits) if u is None else self.device_pick(logits, mx.array(u)[:, None])
            tok, lp, ent = (np.asarray(a) for a in out)
        if self.force is not None:
            tok, lp = _forced(self.force(rows, pos), logits, tok, lp, t)
        return tok, lp, ent


class _Episodes:
    """Every episode's tokens so far (the model's and the appended ones) and where it stands."""

    def __init__(self, tokenizer, prompts, group_size, max_tokens, max_turns):
        n = len(prompts) * group_size
        self.tokenizer, self.n, self.max_tokens, self.max_turns = tokenizer, n, max_tokens, max_turns
        self.eos = np.array(sorted(tokenizer.eos_token_ids), dtype=np.int64)
        self.start_marker, self.end_marker = tokenizer.tool_call_start, tokenizer.tool_call_end or ""
        self.end_ids = tuple(getattr(tokenizer, "tool_call_end_tokens", None) or ())
        self.seq, self.lps, self.ents, self.env = ([[] for _ in range(n)] for _ in range(4))  # env: appended
        self.cached = np.array([len(prompts[r // group_size]) - 1 for r in range(n)])  # (N,) real cache entries
        self.turn_start = np.zeros(n, dtype=int)  # (N,) where the current turn began in seq
        self.finish = [None] * n
        self.stats = EpisodeStats(np.ones(n, int), np.zeros(n, int), np.zeros(n, int), np.zeros(n, bool),
                                  log=[[] for _ in range(n)])  # fmt: skip

    def decode_turns(self, model, cache, rows, y, pick):
        """Decode every batch row until it has ended its turn. Rows that ended stay in the batch
        until a quarter have; their real cache entries are kept (`spans`) before they leave."""
        in_turn = np.ones(len(rows), bool)  # (n,) batch rows still in their turn
        spans = {}  # episode -> its real cache entries, per layer
        while in_turn.any():
            logits = model(y[:, None], cache=cache)[:, -1, :]  # (n, V)
            self.cached[rows[in_turn]] += 1  # the token fed this step is real for rows in their turn
            pos = np.array([min(len(self.seq[r]), self.max_tokens - 1) for r in rows])  # (n,)
            tok, lp, ent = pick(logits, rows, pos)
            for b in np.nonzero(in_turn)[0]:
                in_turn[b] = not self._add(int(rows[b]), int(tok[b]), float(lp[b]), float(ent[b]))
            y = mx.array(tok.astype(np.int32))
            if in_turn.any() and in_turn.mean() <= 1.0 - COMPACT_FRACTION:
                keep = np.nonzero(in_turn)[0]
                spans.update(_spans(cache, rows, np.nonzero(~in_turn)[0], self.cached))  # before they go
                index = mx.array(keep)
                for c in cache:
                    c.filter(index)
                y, rows, in_turn = y[index], rows[keep], in_turn[keep]
        return cache, rows, y, spans

    def _add(self, r: int, tok: int, lp: float, ent: float) -> bool:
        """Append a sampled token; whether it ends the turn."""
        seq = self.seq[r]
        seq.append(tok)
        self.lps[r].append(lp)
        self.ents[r].append(ent)
        self.env[r].append(False)
        return (
            tok in self.eos
            or len(seq) >= self.max_tokens
            or _ends_call(self.tokenizer, seq, self.turn_start[r], self.end_ids, self.end_marker)
        )

    def end_turns(self, rows, renderer) -> dict:
        """Read each ended turn's calls; end the episodes that stop here. Returns episode -> calls."""
        calls_of, tok, stats = {}, self.tokenizer, self.stats
        for r in rows:
            turn = self.seq[r][self.turn_start[r] :]
            calls = parse_calls(tok.decode(turn), self.start_marker, self.end_marker, tok.tool_parser,
                                renderer.schemas)  # fmt: skip  # raw text: markers may be special tokens
            said = _assistant_text(tok.decode(turn), self.start_marker, self.end_marker, renderer.eos_texts.values())
            if said or not calls:
                stats.log[r].append(turn_entry("assistant", said))
            stats.log[r] += [turn_entry("tool_call", c.parse_error, c.name, c.arguments, bool(c.parse_error))
                             for c in calls]  # fmt: skip
            full = len(self.seq[r]) >= self.max_tokens
            if not calls:
                self.finish[r] = "length" if full and turn[-1] not in self.eos else "stop"
            elif stats.turns[r] > self.max_turns:  # the calls of the last turn allowed are not run
                self.finish[r], stats.cut_at_turns[r] = "stop", True
            elif full:
                self.finish[r] = "length"
            else:
                calls_of[r] = calls
        return calls_of

    def append_results(self, calls_of: dict, outcomes: list, renderer) -> dict:
        """Append each episode's tool results (as the template renders them, cut at the budget).
        Returns episode -> the tokens to feed next (the turn's last token, never fed, first)."""
        outcomes, feeds, stats = iter(outcomes), {}, self.stats
        for r, calls in calls_of.items():
            results = [next(outcomes) for _ in calls]
            stats.calls[r] += len(calls)
            stats.errors[r] += sum(o.error for o in results)
            stats.log[r] += [turn_entry("tool", o.content, o.name, error=o.error) for o in results]
            last = self.seq[r][-1]
            suffix = renderer.suffix([(o.name, o.content) for o in results], ended_with=last)
            ids = list(self.tokenizer.encode(suffix, add_special_tokens=False))[: self.max_tokens - len(self.seq[r])]
            self.seq[r] += ids
            self.lps[r] += [0.0] * len(ids)
            self.ents[r] += [0.0] * len(ids)
            self.env[r] += [True] * len(ids)
            if len(self.seq[r]) >= self.max_tokens:  # no room left for the model to answer
                self.finish[r] = "length"
                continue
            stats.turns[r] += 1
            self.turn_start[r] = len(self.seq[r])
            feeds[r] = [last, *ids]
        return feeds

    def rollout(self, prompt_tokens: int) -> Rollout:
        n, tok = self.n, self.tokenizer
        width = max(1, max(map(len, self.seq)))
        tokens = np.full((n, width), pad_id(tok), dtype=np.int32)  # (N, T)
        logprobs = np.zeros((n, width), dtype=np.float32)  # (N, T)
        entropy = np.zeros((n, width), dtype=np.float32)  # (N, T)
        env_mask = np.zeros((n, width), dtype=bool)  # (N, T)
        for r, s in enumerate(self.seq):
            k = len(s)
            tokens[r, :k], logprobs[r, :k], entropy[r, :k], env_mask[r, :k] = s, self.lps[r], self.ents[r], self.env[r]
        lengths = np.array([len(s) for s in self.seq])
        texts = [decode_text(tok, s[:-1] if s and s[-1] in self.eos else s) for s in self.seq]
        roll = Rollout(tokens, logprobs, lengths, list(self.finish), texts, prompt_tokens, env_mask=env_mask)
        roll.entropy = np.where(roll.mask, entropy, 0.0).astype(np.float32)
        roll.turns = self.stats.log
        return roll


def turn_entry(role: str, text: str = "", name: str | None = None, arguments: dict | None = None,
               error: bool = False) -> dict:  # fmt: skip
    """One entry of an episode's turns as samples.jsonl holds it: `role` is assistant (its text),
    tool_call (name, arguments; text: why it did not parse) or tool (name, the result text)."""
    return {"role": role, "text": text, "name": name, "arguments": arguments, "error": bool(error)}


def _assistant_text(raw: str, start: str, end: str, eos_texts) -> str:
    """What the model wrote in a turn besides its calls (their spans and EOS markers cut out);
    read from the raw text, as the markers may be special tokens."""
    out, pos = [], 0
    while start and (i := raw.find(start, pos)) >= 0:
        out.append(raw[pos:i])
        j = raw.find(end, i + len(start)) if end else -1
        pos = j + len(end) if j >= 0 else len(raw)
    out.append(raw[pos:])
    text = "".join(out)
    for e in eos_texts:
        text = text.replace(e, "")
    return text.strip()


def _forced(forced, logits, tok, lp, temperature):
    """The scripted tokens where `forced` >= 0, with their log-probabilities at logits / T."""
    forced = np.asarray(forced)
    take = forced >= 0  # (n,)
    if not take.any():
        return tok, lp
    x = np.asarray(logits.astype(mx.float32)) / (temperature if temperature > 0 else 1.0)  # (n, V)
    top = x.max(axis=1, keepdims=True)  # (n, 1)
    norm = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))  # (n,)
    tok, lp = np.array(tok), np.array(lp)
    rows = np.nonzero(take)[0]
    tok[rows] = forced[rows]
    lp[rows] = x[rows, forced[rows]] - norm[rows]
    return tok, lp


def _ends_call(tokenizer, seq: list[int], start: int, end_ids: tuple, end_marker: str) -> bool:
    """Whether the turn begun at `start` has just written the tool-call end marker."""
    if not end_marker:
        return False
    if end_ids and len(end_ids) == 1:
        return seq[-1] == end_ids[0]
    tail = seq[max(start, len(seq) - len(end_ids) - 2) :]
    return tokenizer.decode(tail).endswith(end_marker)


def _spans(cache, rows, batch_rows, cached) -> dict:
    """episode -> [KVCache per layer] holding only its real entries, for the given batch rows."""
    from mlx_lm.models.cache import KVCache

    out = {}
    lefts = [np.asarray(c.left_padding).tolist() for c in cache]
    for b in batch_rows:
        r, size = int(rows[b]), int(cached[rows[b]])
        layers = []
        for c, left in zip(cache, lefts):
            kv = KVCache()
            kv.keys = c.keys[b : b + 1, :, left[b] : left[b] + size]
            kv.values = c.values[b : b + 1, :, left[b] : left[b] + size]
            kv.offset = size
            layers.append(kv)
        out[r] = layers
    return out


def _merge(parts: list, batch_cache_type):
    """One layer's batch cache of single-row caches, left-padded to the longest: one
    concatenation (BatchKVCache.merge writes row by row, a copy of the whole buffer each)."""
    width = max(p.offset for p in parts)
    pads = [width - p.offset for p in parts]

    def padded(x, pad):  # (1, H, L, D) -> (1, H, width, D)
        return mx.pad(x, [(0, 0), (0, 0), (pad, 0), (0, 0)]) if pad else x

    cache = batch_cache_type(pads)
    cache.keys = mx.concatenate([padded(p.keys, k) for p, k in zip(parts, pads)])  # (n, H, width, D)
    cache.values = mx.concatenate([padded(p.values, k) for p, k in zip(parts, pads)])  # (n, H, width, D)
    cache.offset += width
    cache._idx = width
    return cache


def _continue(body, spans, cached, feeds):
    """The batch cache of the episodes in `feeds` (episode -> tokens to append) from their real
    entries (`spans`), the appended tokens but the last prefilled in one right-padded forward.
    Returns (cache, rows, y) for the next decode phase; `cached` is updated."""
    from mlx_lm.models.cache import BatchKVCache

    keep = sorted(feeds)
    layers = [_merge([spans[r][i] for r in keep], BatchKVCache) for i in range(len(spans[keep[0]]))]
    lengths = [len(feeds[r]) - 1 for r in keep]
    width = max(lengths)
    if width > 0:
        x = mx.array([feeds[r][:-1] + [0] * (width - k) for r, k in zip(keep, lengths)], dtype=mx.int32)  # (n, S)
        for c in layers:
            c.prepare(right_padding=[width - k for k in lengths])
        body(x, cache=layers)  # only the appended tokens go through the model
        for c in layers:
            c.finalize()
        mx.eval([c.state for c in layers])
    for r, k in zip(keep, lengths):
        cached[r] += k
    y = mx.array([feeds[r][-1] for r in keep], dtype=mx.int32)  # (n,)
    return layers, np.array(keep), y


# ------------------------------------------------------------------ what the trainer calls


@dataclass
class Agent:
    """A run's tools, environment and episode settings; `sample` is the trainer's sampler when
    tools or an environment are set."""

    toolbox: Toolbox
    renderer: ResultRenderer
    max_turns: int
    environment: Callable | None = None  # TRL's environment_factory: a class, one instance per episode
    rendering: dict = field(default_factory=dict)  # prompts.render_prompt's options of the run
    live: dict = field(default_factory=dict)  # id(rollout) -> its episodes' environments, until scored

    @classmethod
    def from_config(cls, cfg, tokenizer, toolbox: Toolbox | None = None) -> Agent | None:
        """None without tools or an environment (the single-turn sampler is used, unchanged)."""
        if not cfg.tools and not cfg.environment and toolbox is None:
            return None
        toolbox = toolbox or Toolbox.from_specs(cfg.tools, cfg.tool_timeout)
        env = resolve_environment(cfg.environment) if cfg.environment else None
        schemas = toolbox.schemas
        if env is not None:  # one instance tells the tools (and checks they have schemas)
            probe = env()
            try:
                schemas = schemas + [
                    tool_schema(fn, f"{cfg.environment}.{n}") for n, fn in environment_tools(probe).items()
                ]
            finally:
                _close([probe])
        from grpo_mlx import prompts

        rendering = {k: v for k, v in prompts.options(cfg).items() if k != "max_prompt_length"}
        return cls(toolbox, ResultRenderer(tokenizer, schemas), cfg.max_turns, env, rendering)

    @property
    def schemas(self) -> list[dict]:
        """Every tool's schema, for the chat template's `tools=`."""
        return self.renderer.schemas

    def sample(self, model, tokenizer, cfg, examples: list[dict], seeds, context=None) -> Rollout:
        """The episodes of `examples` (G each). With an environment, an example whose reset
        returned text is replaced in `examples` by one whose prompt ends with that text."""
        return self.episodes(model, tokenizer, examples, cfg.group_size, cfg.max_completion_length, cfg.temperature,
                             cfg.top_p, cfg.top_k, cfg.min_p, seeds, context)  # fmt: skip

    def episodes(self, model, tokenizer, examples: list[dict], group_size: int, max_tokens: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seeds=None,
                 context=None) -> Rollout:  # fmt: skip
        """`sample` with the sampling settings given (grpo-mlx eval, the held-out evaluation)."""
        boxes, envs = self.toolbox, None
        if self.environment is not None:
            envs = [self.environment() for _ in range(len(examples) * group_size)]
            try:
                self._reset(envs, examples, tokenizer, group_size)
            except BaseException:
                _close(envs)
                raise
            box = self.toolbox
            boxes = [Toolbox({**box.functions, **environment_tools(e)}, box.timeout, box.pool) for e in envs]
        roll, stats = generate_episodes(
            model, tokenizer, [ex["prompt_ids"] for ex in examples], group_size, max_tokens,
            boxes, self.renderer, self.max_turns, temperature, top_p, top_k, min_p,
            seeds=seeds,
        )  # fmt: skip
        if envs is not None:
            self.live[id(roll)] = envs
        if context is not None:  # logged with the step's metrics (rewards' log_metric channel)
            for name, value in episode_metrics(stats).items():
                context.log_metric(name, value)
        return roll

    def _reset(self, envs: list, examples: list[dict], tokenizer, G: int) -> None:
        from grpo_mlx import prompts

        for b, ex in enumerate(examples):
            row = {k: v for k, v in ex.items() if k not in ("prompt_text", "prompt_ids")}
            seen = [envs[b * G + g].reset(**row) for g in range(G)]
            if not any(seen):
                continue
            if len(set(seen)) > 1:  # a group's episodes share one prompt (one prefill, one baseline)
                raise UserError(
                    f"environment reset() returned different texts for the {G} episodes of one prompt "
                    f"({seen[0]!r:.60} and {next(s for s in seen if s != seen[0])!r:.60}); GRPO compares the "
                    "episodes of one prompt: make reset depend only on the row (seed it from the row)"
                )
            prompt = ex["prompt"]
            if isinstance(prompt, str):
                prompt = prompt + seen[0]
            else:  # appended to the last message, as TRL does
                prompt = [*prompt[:-1], {**prompt[-1], "content": prompt[-1]["content"] + seen[0]}]
            text = prompts.render_prompt(tokenizer, prompt, **self.rendering, tools=self.schemas)
            examples[b] = {
                **ex,
                "prompt": prompt,
                "prompt_text": text,
                "prompt_ids": prompts.encode_prompt(tokenizer, text),
            }

    def reward_columns(self, roll: Rollout) -> dict | None:
        """The keywords rewards get besides the dataset's: `environments`, one per episode."""
        envs = self.live.get(id(roll))
        return None if envs is None else {"environments": envs}

    def release(self, roll: Rollout) -> None:
        """Close the episodes' environments (once scored)."""
        _close(self.live.pop(id(roll), []))


def _close(envs: list) -> None:
    for env in envs:
        close = getattr(env, "close", None)
        if callable(close):
            close()


def episode_metrics(stats: EpisodeStats) -> dict[str, float]:
    """Per-episode means of calls, failed calls and turns, and the share cut at max_turns."""
    from grpo_mlx import metric_names as M

    return {
        M.TOOL_CALLS: float(stats.calls.mean()),
        M.TOOL_ERRORS: float(stats.errors.mean()),
        M.TOOL_TURNS: float(stats.turns.mean()),
        M.TOOL_CUT: float(stats.cut_at_turns.mean()),
    }
