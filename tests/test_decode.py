"""The compiled decode step (grpo_mlx.decode) samples what the eager step samples."""

import mlx.core as mx
import numpy as np
import pytest

import grpo_mlx.sampler as sampler
from grpo_mlx.config import DEMO_MODEL
from grpo_mlx.decode import StaticCache, static_decoder
from grpo_mlx.policy import load_model
from grpo_mlx.sampler import generate_groups


def _prompts(tok, texts):
    chat = [[{"role": "user", "content": t}] for t in texts]
    return [tok.encode(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)) for c in chat]


def _both(monkeypatch, **kwargs):
    """The same rollout decoded eagerly and compiled, from the same random state."""
    out = {}
    for eager in ("1", "0"):
        monkeypatch.setenv("GRPO_MLX_EAGER_DECODE", eager)
        mx.random.seed(3)
        out[eager] = generate_groups(**kwargs)
    return out["1"], out["0"]


@pytest.mark.parametrize(
    "options",
    [dict(temperature=1.0), dict(temperature=0.7, seeds=[11, 12, 13, 14]), dict(temperature=1.0, top_k=5),
     dict(temperature=0.0)],
)  # fmt: skip
def test_compiled_decode_samples_the_eager_tokens(model_and_tokenizer, monkeypatch, options):
    model, tok = model_and_tokenizer
    monkeypatch.setattr(sampler, "COMPACT_FRACTION", 0.01)  # filter the batch as soon as a row ends
    prompts = _prompts(tok, ["1+1", "12+34", "50+50", "3+4"])
    eager, compiled = _both(monkeypatch, model=model, tokenizer=tok, prompts=prompts, group_size=3, max_tokens=10,
                            **options)  # fmt: skip
    assert len(set(eager.lengths.tolist())) > 1, "rows should end at different steps (the batch is filtered)"
    np.testing.assert_array_equal(eager.tokens, compiled.tokens)
    assert eager.texts == compiled.texts and eager.finish_reasons == compiled.finish_reasons
    np.testing.assert_allclose(eager.logprobs, compiled.logprobs, atol=1e-5)
    np.testing.assert_allclose(eager.entropy, compiled.entropy, atol=1e-5)


def test_compiled_decode_is_used_and_can_be_turned_off(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    made = []
    real = sampler._compiled_decoder
    monkeypatch.setattr(sampler, "_compiled_decoder", lambda *a: made.append(real(*a)) or made[-1])
    for eager in ("0", "1"):
        monkeypatch.setenv("GRPO_MLX_EAGER_DECODE", eager)
        generate_groups(model, tok, _prompts(tok, ["1+1"]), 2, 3)
    assert made[0] is not None and made[1] is None


def test_other_caches_decode_eagerly():
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    assert static_decoder(None, [RotatingKVCache(8)], 4, None) is None
    assert static_decoder(None, [KVCache()], 4, None) is None
    assert static_decoder(None, [], 4, None) is None


def test_static_cache_masks_left_padding_and_unwritten_positions():
    keys = mx.zeros((2, 1, 6, 4))
    c = StaticCache(keys, keys, mx.array(3, dtype=mx.int32), mx.array([3, 1]), mx.array([0, 2]))
    k, _ = c.update_and_fetch(mx.ones((2, 1, 1, 4)), mx.ones((2, 1, 1, 4)))
    assert k.shape == (2, 1, 6, 4) and k[:, 0, 3].sum().item() == 8 and k.sum().item() == 8
    mask = np.array(c.make_mask(1))[:, 0, 0]  # (2, 6)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]])


def _lora_model(dropout=0.0):
    from mlx.utils import tree_map

    from grpo_mlx.config import DEMO_DATA, build_config
    from grpo_mlx.policy import add_adapters

    model, tok = load_model(DEMO_MODEL)
    add_adapters(model, build_config({"data": DEMO_DATA, "lora_dropout": dropout}))
    mx.random.seed(5)
    model.update(tree_map(lambda a: a + 0.05 * mx.random.normal(a.shape), model.trainable_parameters()))
    return model, tok


def test_merged_adapters_give_the_same_model_and_are_restored():
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear

    from grpo_mlx.decode import merged_adapters

    model, _ = _lora_model()
    x = mx.array([[1, 5, 9, 13, 2, 7]])
    before = model(x)
    n_lora = sum(type(m) is LoRALinear for _, m in model.named_modules())
    with merged_adapters(model):
        assert not any(type(m) is LoRALinear for _, m in model.named_modules())
        merged = model(x)
    assert sum(type(m) is LoRALinear for _, m in model.named_modules()) == n_lora > 0
    assert len(tree_flatten(model.trainable_parameters())) == 2 * n_lora  # the adapters train as before
    assert mx.abs(before).max().item() > 0.1
    np.testing.assert_allclose(np.array(merged), np.array(before), atol=1e-4, rtol=1e-4)


def test_adapters_stay_unmerged_with_dropout_or_when_too_big(monkeypatch):
    import grpo_mlx.decode as decode

    model, _ = _lora_model(dropout=0.1)
    model.train()
    assert decode._mergeable(model) == []
    model.eval()
    assert decode._mergeable(model) != []
    monkeypatch.setattr(decode, "MERGE_MAX_BYTES", 16)
    assert decode._mergeable(model) == []


def test_rollout_with_merged_adapters_matches_teacher_forcing(monkeypatch):
    """Sampled log-probs with the folded adapters are those of the adapted model."""
    from grpo_mlx.batch import training_arrays
    from grpo_mlx.logprobs import completion_logprobs

    model, tok = _lora_model()
    prompts = _prompts(tok, ["12+34", "7+8"])
    roll = generate_groups(model, tok, prompts, 3, 8)
    tokens, prompt_lens, mask = training_arrays(prompts, roll, 3, pad_id=tok.eos_token_id)
    forced = np.array(completion_logprobs(model, tokens, prompt_lens, mask.shape[1]))[:, : roll.tokens.shape[1]]
    assert np.abs((forced - roll.logprobs) * roll.mask).max() < 1e-4
