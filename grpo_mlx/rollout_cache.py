"""Leaner rollouts: the prompts' prefilled cache shared by every wave of rows, and a quantized
batch KV cache.

- The prompts are prefilled once, B rows (grpo_mlx.sampler.prefill_prompts); `Prefill.rows`
  gathers any rows' copies of it, so a wave of rows (`--rollout-batch-size`) gets its prompts'
  keys and values without computing them again, also when a group spans two waves.
- mlx-lm 0.32 has a quantized cache for one sequence (QuantizedKVCache) but none for a left-padded
  batch (BatchKVCache.to_quantized does not exist; BatchRotatingKVCache's raises). The class here
  is BatchKVCache's bookkeeping (left padding, offsets, mask, filter) over `mx.quantize` triples,
  with the `bits` / `group_size` attributes by which mlx-lm's attention
  (models.base.scaled_dot_product_attention) switches to its quantized form.
- The prompt is prefilled in full precision and its cache quantized once, before the rows are
  gathered: the G copies are made of quantized tensors, and each completion token is quantized
  as it is appended (mlx-lm's generate does the same after `quantized_kv_start` tokens).
The training pass uses no cache, so `sampling/sampling_logp_difference` measures what this adds.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from grpo_mlx.errors import UserError


def sampler_options(cfg) -> dict:
    """The run configuration's rollout-memory options, as generate_groups takes them."""
    return dict(kv_bits=cfg.kv_bits, kv_group_size=cfg.kv_group_size, rollout_batch_size=cfg.rollout_batch_size)


def wave_slices(n: int, rollout_batch_size: int | None) -> list[slice]:
    """Rows 0..n-1 in consecutive waves of at most rollout_batch_size (None: one wave)."""
    size = n if not rollout_batch_size else min(rollout_batch_size, n)
    return [slice(s, min(s + size, n)) for s in range(0, n, max(size, 1))]


class BatchQuantizedKVCache(BatchKVCache):
    """A left-padded batch cache whose keys and values are (packed, scales, biases) triples."""

    def __init__(self, left_padding, group_size: int = 64, bits: int = 8):
        super().__init__(left_padding)
        self.group_size, self.bits = group_size, bits

    @classmethod
    def from_batch(cls, cache: BatchKVCache, group_size: int, bits: int) -> BatchQuantizedKVCache:
        """`cache` quantized (its valid entries; the growth buffer past them is dropped)."""
        q = cls([0], group_size, bits)
        q.offset, q.left_padding, q._idx = cache.offset, cache.left_padding, cache._idx
        if cache.keys is not None:
            q.keys = q._quantize(cache.keys[..., : cache._idx, :])
            q.values = q._quantize(cache.values[..., : cache._idx, :])
        return q

    def _quantize(self, x) -> tuple:
        if x.shape[-1] % self.group_size:
            raise UserError(
                f"'kv_group_size' = {self.group_size}: must divide the model's attention head size "
                f"{x.shape[-1]}; use --kv-group-size 32 (or another divisor of {x.shape[-1]})"
            )
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def update_and_fetch(self, keys, values):  # keys, values (B, H, L, D)
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            grow = (self.step + n - 1) // self.step * self.step
            # quantizing zeros gives each triple's shapes and dtypes for any bits (3, 5, 6 pack unevenly)
            new_k = self._quantize(mx.zeros((*keys.shape[:2], grow, keys.shape[3]), keys.dtype))
            new_v = self._quantize(mx.zeros((*values.shape[:2], grow, values.shape[3]), values.dtype))
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = tuple(mx.concatenate([x[..., :prev, :], z], axis=2) for x, z in zip(self.keys, new_k))
                self.values = tuple(mx.concatenate([x[..., :prev, :], z], axis=2) for x, z in zip(self.values, new_v))
        self.offset = self.offset + n
        self._idx += n
        for held, new in ((self.keys, self._quantize(keys)), (self.values, self._quantize(values))):
            for h, x in zip(held, new):
                h[..., prev : self._idx, :] = x
        return self.keys_and_values()

    def keys_and_values(self):
        return tuple(x[..., : self._idx, :] for x in self.keys), tuple(x[..., : self._idx, :] for x in self.values)

    def filter(self, batch_indices):
        """Keep the rows batch_indices (in place), then drop the padding columns all of them share."""
        if self.keys is not None:
            self.keys = tuple(x[batch_indices] for x in self.keys)
            self.values = tuple(x[batch_indices] for x in self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shared = min(self.left_padding.tolist())
        if shared > 0:
            if self.keys is not None:
                self.keys = tuple(x[..., shared:, :] for x in self.keys)
                self.values = tuple(x[..., shared:, :] for x in self.values)
            self._idx -= shared
            self.left_padding = self.left_padding - shared

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("a quantized batch cache is decoded as it is; it is not merged, extended or split")

    extend = extract = prepare = finalize = _unsupported
    merge = classmethod(_unsupported)

    @property
    def nbytes(self):
        return 0 if self.keys is None else sum(x.nbytes for x in (*self.keys, *self.values))


class Prefill:
    """The prompts' prefilled caches, computed once; `rows` gives a batch cache for any rows.

    Either `layers` (one B-row BatchKVCache or BatchQuantizedKVCache per layer) or `per_prompt`
    (each prompt's own caches, for cache types without a left-padded batch prefill)."""

    def __init__(self, layers: list | None = None, per_prompt: list | None = None):
        self.layers, self.per_prompt = layers, per_prompt

    def rows(self, prompt_of_row) -> list:
        """A batch cache (one entry per layer) whose row i holds prompt prompt_of_row[i]'s context."""
        prompt_of_row = np.asarray(prompt_of_row)
        if self.layers is not None:
            index = mx.array(prompt_of_row)
            out = []
            for layer in self.layers:
                rows = copy.copy(layer)  # filter replaces the arrays it gathers: the prefill stays as it is
                rows.filter(index)
                out.append(rows)
            return out
        picked = [self.per_prompt[i] for i in prompt_of_row]
        return [type(layer[0]).merge(list(layer)) for layer in zip(*picked)]


def quantize_layers(layers: list, kv_bits: int | None, kv_group_size: int) -> list:
    """The prefilled batch caches quantized to kv_bits (None: as they are)."""
    if kv_bits is None:
        return layers
    out = [BatchQuantizedKVCache.from_batch(c, kv_group_size, kv_bits) for c in layers]
    mx.eval([(c.keys, c.values) for c in out if c.keys is not None])
    return out
