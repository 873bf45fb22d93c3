"""Leaner rollouts on the real demo model: the quantized batch KV cache (valid rollouts, a small
but real log-prob gap to the teacher-forced pass) and waves (the completions of one wave)."""

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx import sampler
from grpo_mlx.batch import training_arrays
from grpo_mlx.errors import UserError
from grpo_mlx.logprobs import completion_logprobs
from grpo_mlx.rollout_cache import BatchQuantizedKVCache, wave_slices
from grpo_mlx.sampler import generate_groups
from grpo_mlx.testing import chat_prompt_ids

HEAD = 32  # the demo model's attention head size (128 hidden / 4 heads)


def _gap(model, tok, prompts, roll, G, temperature=1.0):
    """|sampler - teacher-forced| log-prob per completion token: (mean, max)."""
    tokens, prompt_lens, mask = training_arrays(prompts, roll, G, pad_id=tok.eos_token_id)
    lp = completion_logprobs(model, tokens, prompt_lens, mask.shape[1], temperature)
    T = roll.tokens.shape[1]
    d = np.abs(np.array(lp)[:, :T] - roll.logprobs)[roll.mask]
    return float(d.mean()), float(d.max())


def test_wave_slices_cover_the_rows_in_order():
    assert wave_slices(12, None) == [slice(0, 12)]
    assert wave_slices(12, 20) == [slice(0, 12)]
    assert wave_slices(12, 5) == [slice(0, 5), slice(5, 10), slice(10, 12)]
    assert [i for s in wave_slices(7, 2) for i in range(s.start, s.stop)] == list(range(7))


def test_quantized_cache_attends_like_the_full_one():
    """One decode step's attention over a left-padded batch: close to full precision, not equal."""
    from mlx_lm.models.base import scaled_dot_product_attention
    from mlx_lm.models.cache import BatchKVCache

    mx.random.seed(0)
    k, v = mx.random.normal((3, 2, 9, 64)), mx.random.normal((3, 2, 9, 64))  # (B, H, L, D)
    full = BatchKVCache([0, 4, 2])
    full.update_and_fetch(k, v)
    quant = BatchQuantizedKVCache.from_batch(full, 64, 8)
    q, k1, v1 = (mx.random.normal((3, 2, 1, 64)) for _ in range(3))  # one new token per row
    outs = []
    for c in (full, quant):
        mask = c.make_mask(1)  # as the model makes it: before the new entries
        keys, values = c.update_and_fetch(k1, v1)
        outs.append(scaled_dot_product_attention(q, keys, values, c, scale=0.125, mask=mask))
    err = float(mx.abs(outs[0] - outs[1]).max())
    assert 0 < err < 0.05
    quant.filter(mx.array([1, 2]))  # the rows with padding: the shared padding column goes
    assert quant.left_padding.tolist() == [2, 0] and quant.keys_and_values()[0][0].shape[:3] == (2, 2, 8)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rollouts_are_valid_with_a_small_gap(model_and_tokenizer, bits):
    model, tok = model_and_tokenizer
    prompts = chat_prompt_ids(tok, ["12+34", "7+5", "99+99"])  # different lengths: left padding
    seeds = [3, 4, 5]
    full = generate_groups(model, tok, prompts, 4, 6, seeds=seeds)
    quant = generate_groups(model, tok, prompts, 4, 6, seeds=seeds, kv_bits=bits, kv_group_size=HEAD)
    assert quant.tokens.shape[0] == 12 and quant.logprobs.shape == quant.tokens.shape
    assert set(quant.finish_reasons) <= {"stop", "length"} and all(1 <= n <= 6 for n in quant.lengths)
    assert np.all(quant.logprobs[quant.mask] <= 0) and np.all(quant.logprobs[~quant.mask] == 0)
    full_mean, _ = _gap(model, tok, prompts, full, 4)
    mean, worst = _gap(model, tok, prompts, quant, 4)
    assert full_mean < 1e-5, "without quantization the sampler records the training pass's log-probs"
    assert mean > 10 * full_mean and mean > 1e-5, "a quantized cache changes the log-probs"
    if bits == 8:  # 4 bits drift far more on this small model (as with mlx-lm's own cache, below)
        assert mean < 0.02 and worst < 0.2


@pytest.mark.parametrize("bits", [8, 4])
def test_one_row_decodes_as_mlx_lms_quantized_cache(model_and_tokenizer, bits):
    """A row of the batch cache gives the log-probs of mlx-lm's QuantizedKVCache (prefill in full
    precision, then to_quantized), token by token."""
    from mlx_lm.models.cache import KVCache

    model, tok = model_and_tokenizer
    p = chat_prompt_ids(tok, ["12+34"])[0]
    seq = p + tok.encode("46", add_special_tokens=False)
    reference = [KVCache() for _ in model.layers]
    model(mx.array(p[:-1])[None], cache=reference)
    reference = [c.to_quantized(group_size=HEAD, bits=bits) for c in reference]
    ours = sampler.prefill_prompts(model, [p, p[1:]], bits, HEAD).rows([0])  # a shorter prompt pads the batch
    outs = []
    for cache in (reference, ours):
        logits = mx.concatenate([model(mx.array([[seq[t]]]), cache=cache)[:, -1] for t in range(len(p) - 1, len(seq))])
        outs.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))  # (L, V)
    assert np.abs(outs[0] - outs[1]).max() < 1e-5


def test_four_bits_drift_more_than_eight(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = chat_prompt_ids(tok, ["12+34", "7+5", "99+99", "40+2"])
    gaps = {}
    for bits in (8, 4):
        roll = generate_groups(model, tok, prompts, 4, 6, seeds=[1, 2, 3, 4], kv_bits=bits, kv_group_size=HEAD)
        gaps[bits] = _gap(model, tok, prompts, roll, 4)[0]
    assert gaps[4] > gaps[8]


def test_group_size_must_divide_the_head(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(UserError, match="kv_group_size.*64.*head size 32"):
        generate_groups(model, tok, chat_prompt_ids(tok, ["1+2"]), 2, 3, kv_bits=8, kv_group_size=64)


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("kv_bits", [None, 8])
def test_waves_give_the_completions_of_one_wave(model_and_tokenizer, host, kv_bits):
    """With per-prompt seeds, any wave size (5 splits groups across waves) samples the same."""
    model, tok = model_and_tokenizer
    prompts = chat_prompt_ids(tok, ["12+34", "7+5", "99+99"])
    kw = dict(temperature=1.2, seeds=[7, 8, 9], host_sampling=host, kv_bits=kv_bits, kv_group_size=HEAD)
    one = generate_groups(model, tok, prompts, 4, 8, **kw)
    for size in (5, 4, 1):
        waves = generate_groups(model, tok, prompts, 4, 8, rollout_batch_size=size, **kw)
        assert waves.tokens.shape == one.tokens.shape
        assert np.array_equal(waves.tokens, one.tokens) and np.array_equal(waves.lengths, one.lengths)
        assert np.allclose(waves.logprobs, one.logprobs, atol=1e-5)
        assert waves.texts == one.texts and waves.finish_reasons == one.finish_reasons
        assert waves.decode_steps > one.decode_steps  # the waves ran one after another


def test_waves_prefill_each_prompt_once(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    calls, gathered = [], []
    prefill = sampler.prefill_prompts

    def counting(model, prompts, *args):
        calls.append(len(prompts))
        out = prefill(model, prompts, *args)
        rows = out.rows
        out.rows = lambda idx: gathered.append(list(idx)) or rows(idx)
        return out

    monkeypatch.setattr(sampler, "prefill_prompts", counting)
    generate_groups(model, tok, chat_prompt_ids(tok, ["12+34", "7+5"]), 3, 4, rollout_batch_size=4)
    assert calls == [2], "one prefill of the two prompts"
    assert gathered == [[0, 0, 0, 1], [1, 1]], "the waves take their rows from it; prompt 1 spans both"
