"""The group sampler: G completions for each of B prompts, decoded together.

Choices, each measured with `grpo-mlx bench` (README, "Speed and memory"):
- Prefill: the B prompts (all but their last token) go through the model's body in one
  left-padded batch (mlx-lm's BatchKVCache), without the lm-head, whose prompt logits would be
  thrown away. Each prompt's keys and values are then gathered G times: one prefill per prompt,
  not per completion. Models whose caches are not plain KVCache (sliding windows, SSM state,
  quantized caches) prefill one prompt at a time and merge with their cache type's `merge`.
  With kv_bits the prefilled cache is quantized before the gather (grpo_mlx.rollout_cache).
- Decode: all B*G rows in one batch (or waves of rollout_batch_size rows, each gathered from the
  one prefill), one token per step. Once a quarter of the rows have ended
  (EOS, stop string), the batch and its cache are filtered down to the running rows, so a long
  tail of completions does not pay for the finished ones.
- Sampling is at logits / temperature by inverse CDF: one uniform number per row, the token is
  the first whose cumulative probability reaches it, so the exponentials that normalise the
  distribution also sample it. With top-k / top-p / min-p, mlx-lm's sampler chain filters.
  The recorded log-probability of each token is that of the tempered, unfiltered distribution:
  the quantity the training pass computes (mlx-lm's batch_generate reports the untempered one).
- On the CPU device with a large vocabulary, this sampling runs in numpy: MLX's CPU backend
  evaluates exp one element at a time (~15 ns), numpy's is vectorised (~2 ns), and for a 150k
  vocabulary the softmax of 64 rows would otherwise cost as much as a 0.5B model's forward.
  Both paths draw the same random numbers from MLX's generator, so seeding works the same way.
- On the CPU device the model's SwiGLU MLPs run grpo_mlx.cpu_kernels' arithmetic exp (installed
  by policy.prepare_for_cpu, for training as well): the same exp cost, inside the model.
- Bookkeeping (tokens, EOS, stop strings, lengths) lives in numpy arrays and costs a few
  vectorised operations a step; step t's tokens are read back while step t+1 runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from grpo_mlx.decode import with_merged_adapters

HOST_SAMPLING_MIN_VOCAB = 4096  # below this the MLX softmax is cheap and keeps the pipeline full
COMPACT_FRACTION = 0.25  # filter the batch once this fraction of its rows has ended
PREFILL_STEP = 512  # prompt tokens per prefill forward (bounds the attention's memory)


@dataclass
class Rollout:
    """B*G completions, row b*G + g is completion g of prompt b."""

    tokens: np.ndarray  # (N, T) int32, completion tokens, padded with pad_id() after the end
    logprobs: np.ndarray  # (N, T) float32, sampling log-probabilities (0 after the end)
    lengths: np.ndarray  # (N,) int, tokens in each completion, EOS included
    finish_reasons: list  # (N,) "stop" (EOS or stop string) or "length"
    texts: list  # (N,) completion text (decode_completion): special tokens and the stop string left out
    prompt_tokens: int  # prompt tokens prefilled (each prompt once)
    prefill_time: float = 0.0  # seconds spent prefilling the prompts
    decode_time: float = 0.0  # seconds spent decoding (sampling included, text decoding not)
    decode_steps: int = 0  # decode steps run (batch forwards)
    entropy: np.ndarray | None = None  # (N, T) entropy of the sampling distribution at each token
    env_mask: np.ndarray | None = None  # (N, T) True on tokens an episode appended (tool results), never trained on
    turns: list | None = None  # (N,) each episode's turns (grpo_mlx.episodes), for samples; None single-turn

    @property
    def mask(self) -> np.ndarray:
        mask = np.arange(self.tokens.shape[1])[None] < self.lengths[:, None]  # (N, T)
        return mask if self.env_mask is None else mask & ~self.env_mask  # (N, T) the model's own tokens

    @property
    def completion_ids(self) -> list[list[int]]:
        """Each completion's sampled token ids, up to and including its EOS."""
        return [self.tokens[i, : self.lengths[i]].tolist() for i in range(len(self.texts))]

    def select(self, rows: slice, prompt_tokens: int) -> Rollout:
        """The completions in `rows` (one group: `prompt_tokens` is its prompt's length)."""
        return Rollout(
            self.tokens[rows],
            self.logprobs[rows],
            self.lengths[rows],
            self.finish_reasons[rows],
            self.texts[rows],
            prompt_tokens,
            entropy=None if self.entropy is None else self.entropy[rows],
            env_mask=None if self.env_mask is None else self.env_mask[rows],
            turns=None if self.turns is None else self.turns[rows],
        )

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        """Rows of several rollouts in order, right-padded to the longest (tokens with 0)."""
        t = max(p.tokens.shape[1] for p in parts)

        def pad(a, value):
            return np.pad(a, ((0, 0), (0, t - a.shape[1])), constant_values=value)

        return Rollout(
            np.concatenate([pad(p.tokens, 0) for p in parts]),
            np.concatenate([pad(p.logprobs, 0.0) for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            [r for p in parts for r in p.finish_reasons],
            [s for p in parts for s in p.texts],
            sum(p.prompt_tokens for p in parts),
            entropy=None
            if any(p.entropy is None for p in parts)
            else np.concatenate([pad(p.entropy, 0.0) for p in parts]),
            env_mask=None
            if all(p.env_mask is None for p in parts)
            else np.concatenate(
                [pad(p.env_mask if p.env_mask is not None else np.zeros(p.tokens.shape, bool), False) for p in parts]
            ),  # fmt: skip
            turns=None
            if all(p.turns is None for p in parts)
            else [t for p in parts for t in (p.turns if p.turns is not None else [None] * len(p.texts))],
        )


def pad_id(tokenizer) -> int:
    """The id that pads token rows: the smallest EOS id (never attended to, never trained on)."""
    eos = sorted(tokenizer.eos_token_ids)
    return int(eos[0]) if eos else 0


# ------------------------------------------------------------------ prefill


def prefill_groups(model, prompts: list[list[int]], group_size: int) -> list:
    """A batch cache (one entry per layer) holding each prompt's context (all but its last
    token) G times, rows ordered b*G + g."""
    return prefill_prompts(model, prompts).rows(np.repeat(np.arange(len(prompts)), group_size))


def prefill_prompts(model, prompts: list[list[int]], kv_bits: int | None = None, kv_group_size: int = 64):
    """Each prompt's context (all but its last token) prefilled once: a grpo_mlx.rollout_cache.Prefill,
    whose `rows` gives the batch cache of any rows. kv_bits quantizes it (plain KVCache models)."""
    from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

    from grpo_mlx.errors import UserError
    from grpo_mlx.logprobs import lm_head_split
    from grpo_mlx.rollout_cache import Prefill, quantize_layers

    split = lm_head_split(model)
    body = split[0] if split else model  # the body fills the cache; skip the lm-head
    contexts = [p[:-1] for p in prompts]
    layers = make_prompt_cache(model)
    if all(type(c) is KVCache for c in layers):
        width = max(map(len, contexts))
        lefts = [width - len(c) for c in contexts]
        cache = [BatchKVCache(lefts) for _ in layers]
        x = mx.array([[0] * pad + c for pad, c in zip(lefts, contexts)], dtype=mx.int32)  # (B, P)
        for start in range(0, width, PREFILL_STEP):
            body(x[:, start : start + PREFILL_STEP], cache=cache)
            mx.eval([c.state for c in cache])
        return Prefill(layers=quantize_layers(cache, kv_bits, kv_group_size))
    if kv_bits is not None:
        kinds = sorted({type(c).__name__ for c in layers} - {"KVCache"})
        raise UserError(f"'kv_bits' = {kv_bits}: the quantized rollout cache needs plain KVCache layers; "
                        f"this model also has {', '.join(kinds)} (remove --kv-bits)")  # fmt: skip
    # any other cache type: one prompt at a time, then the type's own batch merge
    per_prompt = []
    for context in contexts:
        c = make_prompt_cache(model)
        for start in range(0, len(context), PREFILL_STEP):
            body(mx.array(context[start : start + PREFILL_STEP])[None], cache=c)
            mx.eval([layer.state for layer in c])
        per_prompt.append(c)
    return Prefill(per_prompt=per_prompt)


# ------------------------------------------------------------------ sampling


def _is_filtered(temperature, top_p, top_k, min_p) -> bool:
    return temperature > 0 and (top_p < 1.0 or top_k > 0 or min_p > 0.0)


def make_device_picker(
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    keyed: bool = False,
    compiled: bool = True,
):
    """A compiled function logits (n, V) -> (token (n,), log-probability (n,), entropy (n,)) on
    MLX arrays. temperature 0 is greedy (log-probabilities then of the untempered distribution).
    keyed: the function takes a second argument u (n, 1), the uniform numbers to sample with.
    compiled=False gives the same function uncompiled (for `grpo-mlx bench`)."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

    inv_temp = 1.0 / temperature if temperature > 0 else 1.0
    chain = None
    if _is_filtered(temperature, top_p, top_k, min_p):
        # logits are tempered before the filters (as vLLM / TRL do), so the chain samples at temp 1
        chain = make_sampler(temp=1.0, top_p=top_p if top_p < 1 else 0.0, top_k=top_k, min_p=min_p)

    def filtered(logprobs):  # (n, V) -> (n, V) with -inf where top-p / top-k / min-p drop a token
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0.0:
            logprobs = apply_min_p(logprobs, min_p)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        return logprobs

    def pick(logits, u=None):
        x = logits.astype(mx.float32) * inv_temp  # (n, V)
        log_norm = mx.logsumexp(x, axis=-1, keepdims=True)  # (n, 1)
        logprobs = x - log_norm  # (n, V)
        if temperature == 0:
            tok = mx.argmax(x, axis=-1)  # (n,)
        elif chain is not None and u is None:
            tok = chain(logprobs)  # (n,)
        else:
            weights = mx.exp(filtered(logprobs) if chain is not None else logprobs)  # (n, V)
            cdf = mx.cumsum(weights, axis=-1)  # (n, V)
            if u is None:
                u = mx.random.uniform(shape=(x.shape[0], 1))  # (n, 1)
            tok = mx.minimum((cdf < u * cdf[:, -1:]).astype(mx.int32).sum(axis=-1), x.shape[-1] - 1)  # (n,)
        lp = mx.take_along_axis(logprobs, tok[:, None], axis=-1)[:, 0]  # (n,)
        entropy = -(mx.exp(logprobs) * logprobs).sum(axis=-1)  # (n,)
        return tok.astype(mx.int32), lp, entropy

    if not compiled:
        return pick
    if keyed:
        return mx.compile(lambda logits, u: pick(logits, u), inputs=mx.random.state, outputs=mx.random.state)
    return mx.compile(pick, inputs=mx.random.state, outputs=mx.random.state)


def host_pick(logits, temperature: float, u=None, block: int = 128):
    """The unfiltered sampler of `make_device_picker`, in numpy: (token (n,), log-prob (n,),
    entropy (n,)). u (n,): the uniform numbers to sample with (default: MLX's generator).

    The inverse CDF is searched in two levels, over sums of `block` probabilities and then within
    the block that holds the target, so no (n, V) cumulative sum is written."""
    if logits.dtype != mx.float32:
        logits = logits.astype(mx.float32)
    x = np.asarray(logits)  # (n, V), evaluates the forward
    if temperature > 0 and temperature != 1.0:
        x = x * np.float32(1.0 / temperature)  # (n, V)
    n, V = x.shape
    rows = np.arange(n)
    z = x - x.max(axis=1, keepdims=True)  # (n, V) logits - max
    e = np.exp(z)  # (n, V) unnormalised probabilities
    nb = -(-V // block)
    blocks = (e if V % block == 0 else np.pad(e, ((0, 0), (0, nb * block - V)))).reshape(n, nb, block)
    block_sums = blocks.sum(axis=2, dtype=np.float64)  # (n, nb)
    total = block_sums.sum(axis=1)  # (n,)
    if temperature == 0:
        tok = x.argmax(axis=1)  # (n,)
    else:
        if u is None:
            u = np.asarray(mx.random.uniform(shape=(n,)), dtype=np.float64)  # (n,) from MLX's generator
        target = u * total  # (n,)
        cum = np.cumsum(block_sums, axis=1)  # (n, nb)
        b = np.minimum((cum < target[:, None]).sum(axis=1), nb - 1)  # (n,) the block holding the target
        before = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0.0)  # (n,)
        inside = before[:, None] + np.cumsum(blocks[rows, b], axis=1, dtype=np.float64)  # (n, block)
        tok = np.minimum(b * block + (inside < target[:, None]).sum(axis=1), V - 1)  # (n,)
    log_total = np.log(total)  # (n,)
    lp = z[rows, tok] - log_total  # (n,)
    entropy = log_total - np.einsum("ij,ij->i", e, z) / total  # (n,)
    return tok.astype(np.int32), lp.astype(np.float32), entropy.astype(np.float32)


# ------------------------------------------------------------------ the loop


def _stop_cut(text: str, stop_strings) -> int | None:
    """End index of the earliest stop string in text (where the completion stops), or None."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return min(ends) if ends else None


def decode_text(tokenizer, ids: list[int]) -> str:
    """Text of token ids as TRL shows completions: special tokens skipped."""
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # a stand-in tokenizer whose decode takes the ids only
        return tokenizer.decode(ids)


def decode_completion(tokenizer, ids: list[int], stop=()) -> str:
    """The completion text rewards and samples see: decoded as TRL decodes (special tokens
    skipped, so the final EOS is not in it) and, as OpenAI-style servers and vLLM return it,
    without the stop string that ended it. The token ids themselves stay as sampled."""
    eos = set(getattr(tokenizer, "eos_token_ids", ()) or ())
    if ids and ids[-1] in eos:  # an EOS that is not a special token (some configs) goes too
        ids = ids[:-1]
    text = decode_text(tokenizer, ids)
    starts = [text.find(s) for s in stop if s and s in text]
    return text[: min(starts)] if starts else text


@with_merged_adapters
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
    host_sampling: bool | None = None,
    seeds: list[int] | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    rollout_batch_size: int | None = None,
) -> Rollout:
    """Sample `group_size` completions of at most `max_tokens` for each prompt (token ids).
    temperature 0 is greedy decoding. `host_sampling` forces the numpy (True) or MLX (False)
    sampler; by default numpy on the CPU device for vocabularies of HOST_SAMPLING_MIN_VOCAB+.
    `seeds` (one per prompt) key each prompt's random numbers, so its completions do not depend
    on which other prompts share the batch (data-parallel ranks sample what one process would).
    `kv_bits` / `kv_group_size` quantize the KV cache the rows decode with; `rollout_batch_size`
    decodes the rows in waves of at most that many, each from the prompts' one prefill (with
    seeds, the completions are those of one wave)."""
    from grpo_mlx.rollout_cache import wave_slices

    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    eos = np.array(sorted(tokenizer.eos_token_ids), dtype=np.int64)
    pad = pad_id(tokenizer)
    n = len(prompts) * group_size

    t_start = time.perf_counter()
    prefilled = prefill_prompts(model, prompts, kv_bits, kv_group_size)
    t_prefill = time.perf_counter()

    tokens = np.full((n, max_tokens), pad, dtype=np.int32)  # (N, T)
    logprobs = np.zeros((n, max_tokens), dtype=np.float32)  # (N, T)
    entropy = np.zeros((n, max_tokens), dtype=np.float32)  # (N, T)
    uniforms = None  # (N, T) per-prompt keyed random numbers, when seeds are given
    if seeds is not None and temperature > 0:
        uniforms = np.concatenate(
            [np.asarray(mx.random.uniform(shape=(group_size, max_tokens), key=mx.random.key(int(s)))) for s in seeds]
        )
    end = np.full(n, max_tokens + 1)  # (N,) tokens in each ended completion; T+1 while running
    last = np.array([p[-1] for p in prompts for _ in range(group_size)], dtype=np.int32)  # (N,)
    waves = wave_slices(n, rollout_batch_size)
    steps = []
    for w in waves:  # views of the (N, T) arrays: each wave writes its rows
        cache = prefilled.rows(np.arange(w.start, w.stop) // group_size)
        if len(waves) == 1:
            prefilled = None  # one wave: the prompts' rows are not needed again
        steps.append(_decode_wave(model, tokenizer, cache, mx.array(last[w]), tokens[w], logprobs[w], entropy[w],
                                  end[w], None if uniforms is None else uniforms[w], eos, max_tokens, temperature,
                                  top_p, top_k, min_p, stop, stop_check_every, host_sampling))  # fmt: skip
    t_decode = time.perf_counter()

    width = min(max(steps), max_tokens)
    roll = _finish(tokenizer, tokens[:, :width], logprobs[:, :width], end, stop, pad, sum(map(len, prompts)))
    roll.entropy = np.where(roll.mask, entropy[:, :width], 0.0).astype(np.float32)  # (N, T)
    roll.prefill_time, roll.decode_time, roll.decode_steps = t_prefill - t_start, t_decode - t_prefill, sum(steps)
    return roll


def _decode_wave(model, tokenizer, cache, y, tokens, logprobs, entropy, end, uniforms, eos, max_tokens, temperature,
                 top_p, top_k, min_p, stop, stop_check_every, host_sampling) -> int:  # fmt: skip
    """Decode the rows of `cache` from their first tokens y (n,), writing tokens, logprobs,
    entropy (n, T) and end (n,) in place; returns the decode steps run."""
    n = len(end)
    rows = np.arange(n)  # (n,) the original row of each row of the batch
    pending = None  # (t, rows, tok, lp) of the step not yet read back
    steps = 0

    def read_back(t, rows_t, tok, lp, ent):
        tok, lp, ent = np.asarray(tok), np.asarray(lp), np.asarray(ent)  # (n,)
        live = end[rows_t] > t  # (n,) rows that had not ended before step t
        tokens[rows_t[live], t] = tok[live]
        logprobs[rows_t[live], t] = lp[live]
        entropy[rows_t[live], t] = ent[live]
        ended = rows_t[live & np.isin(tok, eos)]
        end[ended] = t + 1
        if stop and (t + 1) % stop_check_every == 0:
            _find_stop_strings(tokenizer, tokens, end, t + 1, stop)

    decoder = _compiled_decoder(model, cache, max_tokens, temperature, top_p, top_k, min_p, host_sampling, uniforms)
    decoder = decoder or EagerDecoder(model, cache, (temperature, top_p, top_k, min_p), host_sampling)
    for t in range(max_tokens):
        steps += 1
        u = None if uniforms is None else uniforms[rows, t]  # (n,)
        tok, lp, ent = decoder(y, u)  # (n,) each: numpy when sampled on the host
        host_sampling = decoder.host
        if host_sampling:
            y = mx.array(tok)
        else:
            mx.async_eval(tok, lp, ent)
            y = tok
        if pending is not None:  # the previous step, finished while this one was queued
            read_back(*pending)
        pending = (t, rows, tok, lp, ent)
        if host_sampling:
            read_back(*pending)
            pending = None
        done_by = t + 1 if pending is None else t  # steps read back so far
        running = end[rows] > done_by  # (n,)
        if not running.any():
            pending = None  # every row had ended: the queued step is not needed
            break
        if running.mean() <= 1.0 - COMPACT_FRACTION and all(hasattr(c, "filter") for c in cache):
            keep = np.nonzero(running)[0]  # (n',)
            index = mx.array(keep)
            decoder.filter(index)
            y = y[index]
            rows = rows[keep]
    if pending is not None:
        read_back(*pending)
    if stop:  # every row: one that met EOS between two checks may hold a stop string before it
        _find_stop_strings(tokenizer, tokens, end, min(steps, max_tokens), stop, every_row=True)
    return steps


class EagerDecoder:
    """One decode step through the model's own graph and the KV caches as they are: sampled in
    numpy (`host`, decided at the first step unless forced) or by MLX's compiled picker."""

    def __init__(self, model, cache, sampling: tuple, host_sampling: bool | None):
        self.model, self.cache, self.sampling, self.host = model, cache, sampling, host_sampling
        self.pick = None

    def __call__(self, y, u=None):
        """(token, log-prob, entropy) (n,) each from the last tokens y (n,); u (n,) keyed uniforms."""
        logits = self.model(y[:, None], cache=self.cache)[:, -1, :]  # (n, V)
        if self.host is None:
            self.host = (
                mx.default_device() == mx.cpu
                and logits.shape[-1] >= HOST_SAMPLING_MIN_VOCAB
                and not _is_filtered(*self.sampling)
            )
        if self.host:
            return host_pick(logits, self.sampling[0], u)
        self.pick = self.pick or make_device_picker(*self.sampling, keyed=u is not None)
        return self.pick(logits) if u is None else self.pick(logits, mx.array(u)[:, None])

    def filter(self, index) -> None:
        for c in self.cache:
            c.filter(index)


def _compiled_decoder(model, cache, max_tokens, temperature, top_p, top_k, min_p, host_sampling, uniforms):
    """grpo_mlx.decode's compiled step where it applies: MLX sampling (not the numpy sampler, which
    the CPU device uses for large vocabularies) over plain batch caches; None decodes eagerly."""
    from grpo_mlx import decode

    vocab = getattr(model, "_grpo_vocab", 0)  # known once prefill has split off the lm-head
    if not decode.enabled() or host_sampling or not vocab:
        return None
    numpy_default = mx.default_device() == mx.cpu and vocab >= HOST_SAMPLING_MIN_VOCAB
    if host_sampling is None and numpy_default and not _is_filtered(temperature, top_p, top_k, min_p):
        return None  # the numpy sampler's case
    picker = make_device_picker(temperature, top_p, top_k, min_p, keyed=uniforms is not None, compiled=False)
    return decode.static_decoder(model, cache, max_tokens, picker)


def _find_stop_strings(tokenizer, tokens, end, t, stop, every_row: bool = False):
    """End rows (not already ended, or `every_row`) whose text within the first t tokens (and
    before their end) holds a stop string. The raw text, special tokens included, is searched,
    so a special token's text (`<|im_end|>` for a base model whose EOS is another) stops too."""
    for row in np.nonzero(end > 0 if every_row else end > t)[0]:
        ids = tokens[row, : min(t, end[row])].tolist()
        if _stop_cut(tokenizer.decode(ids), stop) is not None:
            # the shortest prefix of tokens whose text contains the stop string
            for k in range(1, t + 1):
                if _stop_cut(tokenizer.decode(ids[:k]), stop) is not None:
                    end[row] = k
                    break


def _finish(tokenizer, tokens, logprobs, end, stop, pad, prompt_tokens) -> Rollout:
    n, t = tokens.shape
    lengths = np.minimum(end, t)  # (N,)
    reasons = ["stop" if e <= t else "length" for e in end]
    keep = np.arange(t)[None] < lengths[:, None]  # (N, T)
    tokens = np.where(keep, tokens, pad).astype(np.int32)  # (N, T)
    logprobs = np.where(keep, logprobs, 0.0).astype(np.float32)  # (N, T)
    texts = [decode_completion(tokenizer, tokens[row, : lengths[row]].tolist(), stop) for row in range(n)]
    return Rollout(tokens, logprobs, lengths, reasons, texts, prompt_tokens)
