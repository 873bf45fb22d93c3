"""The group sampler: G completions for each of B prompts, decoded together.

Each prompt is prefilled once (all but its last token) and its KV cache is shared by its G
completions: the merged batch cache holds G copies of the prompt's keys and values made by
mlx-lm's `merge`, not G prefills. Then all B*G rows decode in one batch, one token per step.
Per-row stopping (EOS, stop strings, token budget) is tracked in MLX arrays; Python only looks at
the previous step's result, so the device keeps working while Python bookkeeps.

Sampling is at logits / temperature, then top-k / top-p / min-p via mlx-lm's sampler chain;
the recorded log-probability of each token is that of the tempered, unfiltered distribution:
the same quantity the training pass computes (shared/DESIGN.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass
class Rollout:
    """B*G completions, row b*G + g is completion g of prompt b."""

    tokens: np.ndarray  # (N, T) int32, completion tokens, padded with pad_id after the end
    logprobs: np.ndarray  # (N, T) float32, sampling log-probabilities (0 after the end)
    lengths: np.ndarray  # (N,) int, tokens in each completion, EOS included
    finish_reasons: list  # (N,) "stop" (EOS or stop string) or "length"
    texts: list  # (N,) decoded completion text, EOS not included
    prompt_tokens: int  # prompt tokens prefilled (each prompt once)

    @property
    def mask(self) -> np.ndarray:
        return np.arange(self.tokens.shape[1])[None] < self.lengths[:, None]  # (N, T)


def _prefill(model, prompt_ids):
    """Prefill one prompt (all but its last token) into a fresh cache; the last token is fed
    in the first decode step, so that step yields every row's first-token logits together."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    if len(prompt_ids) > 1:
        model(mx.array(prompt_ids[:-1])[None], cache=cache)  # (1, P-1, V) discarded
        mx.eval([c.state for c in cache])
    return cache


def _shared_batch_cache(caches, group_size):
    """One batch cache whose rows are each prompt's cache repeated G times."""
    rows = [c for c in caches for _ in range(group_size)]
    return [type(layer[0]).merge([row[i] for row in rows]) for i, layer in enumerate(zip(*rows))]


def _make_token_sampler(temperature, top_p, top_k, min_p):
    from mlx_lm.sample_utils import make_sampler

    if temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    # logits are tempered before the filters (as vLLM / TRL do), so the chain samples at temp 1
    return make_sampler(temp=1.0, top_p=top_p if top_p < 1 else 0.0, top_k=top_k, min_p=min_p)


def _stop_cut(text: str, stop_strings) -> int | None:
    """End index of the earliest stop string in text (the stop string is kept), or None."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return min(ends) if ends else None


def generate_groups(
    model,
    tokenizer,
    prompts: list[list[int]],
    group_size: int,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    stop: list[str] | tuple = (),
    stop_check_every: int = 4,
) -> Rollout:
    """Sample `group_size` completions of at most `max_tokens` for each prompt (token ids).
    temperature 0 is greedy decoding."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    eos = sorted(tokenizer.eos_token_ids)
    pad_id = eos[0] if eos else 0
    sample = _make_token_sampler(temperature, top_p, top_k, min_p)
    inv_temp = 1.0 / temperature if temperature > 0 else 1.0

    cache = _shared_batch_cache([_prefill(model, p) for p in prompts], group_size)
    n = len(prompts) * group_size
    y = mx.array([p[-1] for p in prompts for _ in range(group_size)])  # (N,)
    eos_arr = mx.array(eos) if eos else None
    done = mx.zeros((n,), dtype=mx.bool_)  # (N,)
    toks, lps, dones = [], [], []

    def step(y, done):
        logits = model(y[:, None], cache=cache)[:, -1, :].astype(mx.float32) * inv_temp  # (N, V)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (N, V)
        tok = sample(logprobs)  # (N,)
        lp = mx.take_along_axis(logprobs, tok[:, None], axis=-1)[:, 0]  # (N,)
        tok = mx.where(done, pad_id, tok)  # rows already finished emit padding
        lp = mx.where(done, 0.0, lp)
        hit_eos = mx.any(tok[:, None] == eos_arr[None], axis=-1) if eos_arr is not None else done
        return tok, lp, done | hit_eos

    stop_at = np.full(n, -1)  # token index where a stop string ended each row
    for t in range(max_tokens):
        y, lp, done = step(y, done)
        mx.async_eval(y, lp, done)
        toks.append(y)
        lps.append(lp)
        dones.append(done)
        if t == 0:
            continue
        # look at the previous step (already computed) so the device is never idle
        if bool(mx.all(dones[-2]).item()):
            break
        if stop and t % stop_check_every == 0:
            _find_stop_strings(tokenizer, toks[:-1], dones[-2], stop, stop_at)
            if np.all((stop_at >= 0) | np.array(dones[-2])):
                break

    tokens = np.array(mx.stack(toks, axis=1)) if toks else np.zeros((n, 0), np.int32)  # (N, T)
    logprobs = np.array(mx.stack(lps, axis=1)) if lps else np.zeros((n, 0), np.float32)  # (N, T)
    finished = np.array(mx.stack(dones, axis=1)) if dones else np.zeros((n, 0), bool)  # (N, T)
    if stop:
        _find_stop_strings(tokenizer, toks, dones[-1] if dones else done, stop, stop_at)
    return _finish(tokenizer, tokens, logprobs, finished, stop_at, stop, pad_id, sum(map(len, prompts)))


def _find_stop_strings(tokenizer, toks, done_prev, stop, stop_at):
    """Mark rows whose text so far contains a stop string (rows not already ended by EOS)."""
    ids = np.array(mx.stack(toks, axis=1))  # (N, t)
    done_prev = np.array(done_prev)
    for row in np.nonzero((stop_at < 0) & ~done_prev)[0]:
        text = tokenizer.decode(ids[row].tolist())
        if _stop_cut(text, stop) is not None:
            # find the shortest prefix of tokens whose text contains the stop string
            for k in range(1, ids.shape[1] + 1):
                if _stop_cut(tokenizer.decode(ids[row, :k].tolist()), stop) is not None:
                    stop_at[row] = k
                    break


def _finish(tokenizer, tokens, logprobs, finished, stop_at, stop, pad_id, prompt_tokens) -> Rollout:
    n, t = tokens.shape
    eos_step = np.where(finished.any(axis=1), finished.argmax(axis=1) + 1, t + 1)  # (N,) EOS at index-1
    stop_step = np.where(stop_at >= 0, stop_at, t + 1)  # (N,)
    ended = np.minimum(eos_step, stop_step)  # (N,)
    lengths = np.minimum(ended, t)  # (N,)
    reasons = ["stop" if e <= t else "length" for e in ended]
    keep = np.arange(t)[None] < lengths[:, None]  # (N, T)
    tokens = np.where(keep, tokens, pad_id).astype(np.int32)  # (N, T)
    logprobs = np.where(keep, logprobs, 0.0).astype(np.float32)  # (N, T)
    eos_ids = set(tokenizer.eos_token_ids)
    texts = []
    for row in range(n):
        ids = tokens[row, : lengths[row]].tolist()
        if ids and ids[-1] in eos_ids and eos_step[row] <= stop_step[row]:
            ids = ids[:-1]
        text = tokenizer.decode(ids)
        cut = _stop_cut(text, stop) if stop else None
        texts.append(text[:cut] if cut is not None else text)
    return Rollout(tokens, logprobs, lengths, reasons, texts, prompt_tokens)
