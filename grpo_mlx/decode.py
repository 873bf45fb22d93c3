"""A compiled decode step over a fixed-size KV cache: one graph per batch size instead of a
fresh graph of a few hundred small operations every token.

A small model's decode step is bound by dispatching those operations, not by its arithmetic.
mx.compile needs the same shapes from step to step, and mlx-lm's BatchKVCache returns keys
that grow by one position a step; `StaticCache` instead holds room for every position the
rollout will reach, writes each new key at an index held in an array (mx.slice_update), and
masks the positions not yet written (and each row's left padding). Masked positions add
exp(-inf) = 0 to the softmax, so the attention is that of the growing cache up to the order of
its float sums. The token picker runs inside the same compiled function.

Each LoRA layer adds four operations to its linear layer (two matmuls, a scale, an add): over
a rollout the adapters do not change, so `merged_adapters` folds them into dense weights for
its length (W + scale * A B, mlx-lm's own fuse), when the copies are small (MERGE_MAX_BYTES).
That changes the float sums' order only: x (W + s A B) against x W + s (x A) B.

Only plain BatchKVCache layers (what prefill_groups builds for full-attention models) qualify;
everything else decodes eagerly as before (`static_decoder` returns None).
"""

from __future__ import annotations

import contextlib
import functools
import os

import mlx.core as mx
import mlx.nn as nn

# dense copies of the adapted weights made for a rollout stay under this many bytes: on small
# models the LoRA operations cost more than the copy; large models are bound by reading weights
MERGE_MAX_BYTES = 256 * 2**20


class StaticCache:
    """One layer's cache as mlx-lm's attention uses it: update_and_fetch, offset (the RoPE
    position of each row), make_mask. Its arrays are the compiled step's inputs and outputs;
    `pos` (write index, () int32), `offset` (n,) and `left` (n,) are shared by all layers."""

    def __init__(self, keys, values, pos, offset, left):
        self.keys, self.values, self.pos, self.offset, self.left = keys, values, pos, offset, left

    def update_and_fetch(self, keys, values):  # keys (n, H, 1, D)
        at = self.pos[None]  # (1,) the write index along the positions axis
        self.keys = mx.slice_update(self.keys, keys, at, axes=(2,))
        self.values = mx.slice_update(self.values, values, at, axes=(2,))
        return self.keys, self.values  # (n, H, C, D) each, the unwritten tail masked

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        j = mx.arange(self.keys.shape[2])[None]  # (1, C)
        mask = (j >= self.left[:, None]) & (j <= self.pos)  # (n, C) written, not left padding
        return mask[:, None, None, :]  # (n, 1, 1, C)


class StaticDecoder:
    """Decodes the rows of a prefilled batch cache one token a step through one compiled
    function (the model's forward, the cache write and the token picker)."""

    def __init__(self, model, cache: list, max_tokens: int, picker):
        width = cache[0]._idx
        capacity = width + max_tokens
        self.keys, self.values = [], []
        for c in cache:
            k, v = c.keys[..., :width, :], c.values[..., :width, :]  # (n, H, width, D)
            pad = [(0, 0), (0, 0), (0, capacity - width), (0, 0)]
            self.keys.append(mx.pad(k, pad))
            self.values.append(mx.pad(v, pad))
        self.pos = mx.array(width, dtype=mx.int32)
        self.offset = cache[0].offset.astype(mx.int32)  # (n,) RoPE position of the next token
        self.left = cache[0].left_padding.astype(mx.int32)  # (n,)
        mx.eval(self.keys, self.values, self.pos, self.offset, self.left)

        def step(y, keys, values, pos, offset, left, *u):
            layers = [StaticCache(k, v, pos, offset, left) for k, v in zip(keys, values)]
            logits = model(y[:, None], cache=layers)[:, -1, :]  # (n, V)
            tok, lp, ent = picker(logits, *u)  # (n,) each
            return tok, lp, ent, [c.keys for c in layers], [c.values for c in layers], pos + 1, offset + 1

        state = [model.state, mx.random.state]
        self._step = mx.compile(step, inputs=state, outputs=[mx.random.state])

    host = False  # sampled on the device (the sampler's loop reads this)

    def __call__(self, y, u=None):
        """Tokens, log-probs, entropies (n,) of one step from the last tokens y (n,); u (n,):
        the uniform numbers of a keyed picker (numpy)."""
        keyed = () if u is None else (mx.array(u)[:, None],)
        tok, lp, ent, self.keys, self.values, self.pos, self.offset = self._step(
            y, self.keys, self.values, self.pos, self.offset, self.left, *keyed
        )
        return tok, lp, ent

    def filter(self, index) -> None:
        """Keep the rows `index` (n',) of the batch (a new batch size: one more trace)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.offset, self.left = self.offset[index], self.left[index]


def static_decoder(model, cache: list, max_tokens: int, picker):
    """A StaticDecoder for a cache of plain BatchKVCache layers, else None (decode eagerly)."""
    from mlx_lm.models.cache import BatchKVCache

    if not cache or not all(type(c) is BatchKVCache and c.keys is not None for c in cache):
        return None
    if len({c._idx for c in cache}) != 1:
        return None
    return StaticDecoder(model, cache, max_tokens, picker)


def enabled() -> bool:
    """GRPO_MLX_EAGER_DECODE=1 turns the compiled step off (to compare the two; a fallback)."""
    return os.environ.get("GRPO_MLX_EAGER_DECODE", "") != "1"


def _mergeable(model: nn.Module) -> list:
    """(parent, name, layer) of the LoRA layers over plain float Linear layers that can be
    folded: no dropout in effect (a folded layer could not drop), all together under
    MERGE_MAX_BYTES; [] when any cannot (a half-merged model would gain little)."""
    from mlx_lm.tuner.lora import LoRALinear

    found, size = [], 0
    for _, parent in model.named_modules():
        for name, child in parent.children().items():
            if type(child) is LoRALinear:
                if type(child.linear) is not nn.Linear or (child.dropout._p_1 < 1 and child.training):
                    return []
                found.append((parent, name, child))
                size += child.linear.weight.nbytes
    return found if size <= MERGE_MAX_BYTES else []


@contextlib.contextmanager
def merged_adapters(model: nn.Module):
    """The model with its LoRA layers folded into dense Linear layers for the block, restored
    after. GRPO_MLX_MERGE_ADAPTERS=0 leaves them as they are."""
    layers = [] if os.environ.get("GRPO_MLX_MERGE_ADAPTERS", "") == "0" else _mergeable(model)
    for parent, name, layer in layers:
        parent[name] = layer.fuse()  # lazily W + scale * (A B)^T, evaluated by the first forward
    try:
        yield model
    finally:
        for parent, name, layer in layers:
            parent[name] = layer


def with_merged_adapters(fn):
    """fn(model, ...) run inside merged_adapters(model)."""

    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        with merged_adapters(model):
            return fn(model, *args, **kwargs)

    return wrapped
