"""The training pass's log-probabilities: the chunked lm-head equals whole logits (values and
gradients), models that cannot be split fall back, gradient checkpointing changes nothing."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from grpo_mlx.config import DEMO_DATA, build_config
from grpo_mlx.logprobs import chunked_token_logprobs, completion_logprobs, lm_head_split, token_logprobs_from_logits
from grpo_mlx.policy import add_adapters

VOCAB = 5000


def tiny_qwen(cls=None, tie=True):
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs.from_dict(
        dict(
            model_type="qwen2",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=VOCAB,
            rms_norm_eps=1e-6,
            rope_theta=1e4,
            tie_word_embeddings=tie,
        )
    )
    mx.random.seed(0)
    model = (cls or qwen2.Model)(args)
    mx.eval(model.parameters())
    return model


def batch():
    mx.random.seed(1)
    tokens = mx.random.randint(0, VOCAB, (6, 20))  # (N, L) right-padded rows
    prompt_lens = mx.array([3, 4, 5, 3, 7, 5])  # (N,)
    weights = mx.random.normal((6, 12))  # (N, T) a cotangent that weighs every position
    return tokens, prompt_lens, weights


def whole_logits_logprobs(model, tokens, prompt_lens, T, temperature):
    """The reference: the model's own (N, L-1, V) logits, gathered, then log-softmax."""
    logits = model(tokens[:, :-1])  # (N, L-1, V)
    positions = mx.minimum(prompt_lens[:, None] - 1 + mx.arange(T)[None], tokens.shape[1] - 2)  # (N, T)
    logits = mx.take_along_axis(logits, positions[..., None], axis=1)  # (N, T, V)
    return token_logprobs_from_logits(logits, mx.take_along_axis(tokens, positions + 1, axis=1), temperature)


def value_and_grads(model, fn):
    tokens, prompt_lens, weights = batch()
    loss = lambda: (fn(model, tokens, prompt_lens) * weights).sum()  # noqa: E731
    value, grads = nn.value_and_grad(model, loss)()
    return value.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_gradients_equal_whole_logits(tie, temperature):
    model = tiny_qwen(tie=tie)
    add_adapters(model, build_config({"model": "tiny", "data": DEMO_DATA, "num_layers": -1, "lora_rank": 4}))
    assert lm_head_split(model) is not None and model._grpo_vocab == VOCAB
    whole = value_and_grads(model, lambda m, t, p: whole_logits_logprobs(m, t, p, 12, temperature))
    # 16 rows per chunk (72 rows: 5 chunks, the last one short), and everything in one chunk
    for chunk_bytes in (4 * VOCAB * 16, 2**40):
        chunked = value_and_grads(
            model, lambda m, t, p, c=chunk_bytes: completion_logprobs(m, t, p, 12, temperature, c)
        )
        assert chunked[0] == pytest.approx(whole[0], rel=1e-5)
        assert chunked[1].keys() == whole[1].keys() and len(whole[1]) > 0
        for name, g in whole[1].items():
            np.testing.assert_allclose(
                np.array(chunked[1][name]), np.array(g), rtol=1e-4, atol=1e-5 * float(mx.abs(g).max())
            )


def test_chunked_pass_works_inside_compile():
    model = tiny_qwen()
    add_adapters(model, build_config({"model": "tiny", "data": DEMO_DATA, "num_layers": -1, "lora_rank": 4}))
    lm_head_split(model)  # checked eagerly, as the sampler's prefill does before every training pass
    tokens, prompt_lens, weights = batch()
    loss = lambda: (completion_logprobs(model, tokens, prompt_lens, 12, 1.0, 4 * VOCAB * 16) * weights).sum()  # noqa: E731
    step = mx.compile(nn.value_and_grad(model, loss), inputs=[model.state], outputs=[model.state])
    value, grads = step()
    eager = value_and_grads(model, lambda m, t, p: whole_logits_logprobs(m, t, p, 12, 1.0))
    assert value.item() == pytest.approx(eager[0], rel=1e-5)


def test_models_that_postprocess_logits_are_not_split():
    from mlx_lm.models import qwen2

    class SoftCapped(qwen2.Model):
        def __call__(self, *args, **kwargs):
            return 30.0 * mx.tanh(super().__call__(*args, **kwargs) / 30.0)

    model = tiny_qwen(SoftCapped)
    assert lm_head_split(model) is None and model._grpo_vocab == 0
    tokens, prompt_lens, _ = batch()
    np.testing.assert_allclose(
        np.array(completion_logprobs(model, tokens, prompt_lens, 12)),
        np.array(whole_logits_logprobs(model, tokens, prompt_lens, 12, 1.0)),
        rtol=1e-6,
    )


def test_chunked_pass_keeps_memory_to_a_few_chunks():
    D, V, rows = 32, 32000, 4096
    head = nn.Linear(D, V, bias=False)
    head.freeze()
    hidden = mx.random.normal((1, rows, D))
    targets = mx.random.randint(0, V, (1, rows))
    mx.eval(head.parameters(), hidden, targets)

    def peak(fn):
        step = mx.compile(mx.grad(lambda h: fn(h).sum()))
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(step(hidden))
        return mx.get_peak_memory() - base

    full = rows * V * 4  # one float32 (rows, V) array: 524 MB
    chunked = peak(lambda h: chunked_token_logprobs(head, h, targets, 1.0, V, chunk_bytes=2**20))
    assert chunked < full / 8


@pytest.mark.parametrize("num_layers", [-1, 1], ids=["every-block-adapted", "blocks-without-adapters"])
def test_grad_checkpoint_gives_the_same_gradients(num_layers):
    grads = {}
    for on in (False, True):
        model = tiny_qwen()
        cfg = {"model": "tiny", "data": DEMO_DATA, "num_layers": num_layers, "lora_rank": 4, "grad_checkpoint": on}
        add_adapters(model, build_config(cfg))
        assert getattr(type(model.layers[0]), "_grpo_checkpointed", False) == on
        grads[on] = value_and_grads(model, lambda m, t, p: completion_logprobs(m, t, p, 12))
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    for name, g in grads[False][1].items():
        np.testing.assert_allclose(np.array(grads[True][1][name]), np.array(g), rtol=1e-5, atol=1e-7)
    assert f"layers.{len(model.layers) - 1}" in str(sorted(grads[True][1])), "parameter names are unchanged"


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_token_logprobs_match_naive_log_softmax(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(2, 4, 11))  # (N, T, V), float64 reference
    targets = rng.integers(0, 11, size=(2, 4))  # (N, T)
    x = logits / temperature
    naive = x - np.log(np.exp(x).sum(-1, keepdims=True))  # (N, T, V) full log-softmax
    expected = np.take_along_axis(naive, targets[..., None], axis=-1)[..., 0]  # (N, T)
    got = token_logprobs_from_logits(mx.array(logits.astype(np.float32)), mx.array(targets), temperature)
    assert got.dtype == mx.float32 and got.shape == (2, 4)
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-5)


def test_token_logprobs_half_precision_input_gives_float32():
    logits = mx.array([[[0.0, math.log(3.0)]]], dtype=mx.float16)  # (1, 1, 2): p = [1/4, 3/4]
    got = token_logprobs_from_logits(logits, mx.array([[1]]))  # (1, 1)
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), [[math.log(0.75)]], atol=1e-3)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_from_logits(logits, mx.array([[1]]), temperature=0.0)
