"""The group sampler on the real demo model: shared prefill, per-row stopping, log-probs."""

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx.batch import training_arrays
from grpo_mlx.logprobs import completion_logprobs
from grpo_mlx.sampler import generate_groups
from grpo_mlx.testing import chat_prompt_ids


def test_shapes_eos_kept_and_finish_reasons(model_and_tokenizer):
    model, tok = model_and_tokenizer
    mx.random.seed(0)
    prompts = chat_prompt_ids(tok, ["12+34", "55+66", "90+10"])
    roll = generate_groups(model, tok, prompts, group_size=4, max_tokens=6)
    n = 3 * 4
    assert roll.tokens.shape[0] == n and roll.logprobs.shape == roll.tokens.shape
    eos = tok.eos_token_id
    for i in range(n):
        ids = roll.tokens[i, : roll.lengths[i]].tolist()
        if roll.finish_reasons[i] == "stop":
            assert ids[-1] == eos, "the EOS token stays in the completion"
            assert eos not in ids[:-1]
            assert tok.decode(ids[:-1]) == roll.texts[i]
        else:
            assert roll.lengths[i] == 6 and eos not in ids
        # the mask covers exactly the completion, EOS included
        assert roll.mask[i].sum() == roll.lengths[i]
        assert np.all(roll.logprobs[i, roll.lengths[i] :] == 0)


def test_length_limit_reports_length(model_and_tokenizer):
    model, tok = model_and_tokenizer
    roll = generate_groups(model, tok, chat_prompt_ids(tok, ["12+34"]), group_size=3, max_tokens=1)
    # a sum has at least two digits, so one token can never reach EOS
    assert roll.finish_reasons == ["length"] * 3 and list(roll.lengths) == [1, 1, 1]


def test_sampled_logprobs_match_teacher_forcing(model_and_tokenizer):
    model, tok = model_and_tokenizer
    mx.random.seed(1)
    prompts = chat_prompt_ids(tok, ["12+34", "7+5", "99+99"])  # different prompt lengths
    for temperature in (1.0, 0.7):
        roll = generate_groups(model, tok, prompts, group_size=4, max_tokens=6, temperature=temperature)
        tokens, prompt_lens, mask = training_arrays(prompts, roll, 4, pad_id=tok.eos_token_id)
        lp = completion_logprobs(model, tokens, prompt_lens, mask.shape[1], temperature)
        T = roll.tokens.shape[1]
        diff = np.abs(np.array(lp)[:, :T] - roll.logprobs) * roll.mask
        assert diff.max() < 1e-4


def test_group_rows_share_prompt_but_differ(model_and_tokenizer):
    model, tok = model_and_tokenizer
    mx.random.seed(2)
    roll = generate_groups(model, tok, chat_prompt_ids(tok, ["47+38"]), group_size=16, max_tokens=5, temperature=1.5)
    assert len(set(roll.texts)) > 1, "16 samples at temperature 1.5 should not all be equal"


def test_greedy_is_deterministic_and_matches_single_row(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = chat_prompt_ids(tok, ["12+34", "5+6", "80+19"])
    a = generate_groups(model, tok, prompts, group_size=2, max_tokens=6, temperature=0)
    b = generate_groups(model, tok, prompts[1:2], group_size=1, max_tokens=6, temperature=0)
    assert a.texts[2] == a.texts[3] == b.texts[0]
    assert a.texts[0] == a.texts[1]


def test_stop_strings_end_rows(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = chat_prompt_ids(tok, ["12+34"])
    greedy = generate_groups(model, tok, prompts, group_size=1, max_tokens=6, temperature=0)
    first_char = greedy.texts[0][0]
    roll = generate_groups(
        model, tok, prompts, group_size=2, max_tokens=6, temperature=0, stop=[first_char], stop_check_every=1
    )
    assert roll.texts == ["", ""]  # the stop string is not part of the text (OpenAI-style servers, vLLM)
    assert roll.finish_reasons == ["stop", "stop"] and list(roll.lengths) == [1, 1]


# ------------------------------------------------------------------ the fast paths


def _teacher_forced_gap(model, tok, prompts, roll, G, temperature):
    tokens, prompt_lens, mask = training_arrays(prompts, roll, G, pad_id=tok.eos_token_id)
    lp = completion_logprobs(model, tokens, prompt_lens, mask.shape[1], temperature)
    T = roll.tokens.shape[1]
    return float((np.abs(np.array(lp)[:, :T] - roll.logprobs) * roll.mask).max())


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_numpy_and_mlx_samplers_agree(model_and_tokenizer, temperature):
    """The numpy sampler (CPU, large vocabularies) and the MLX one draw the same uniform numbers:
    same tokens, and both record the teacher-forced log-probabilities."""
    model, tok = model_and_tokenizer
    prompts = chat_prompt_ids(tok, ["12+34", "7+5", "99+99"])
    rolls = {}
    for host in (True, False):
        mx.random.seed(5)
        rolls[host] = generate_groups(model, tok, prompts, 4, 6, temperature=temperature, host_sampling=host)
        assert _teacher_forced_gap(model, tok, prompts, rolls[host], 4, temperature or 1.0) < 1e-4
    width = min(r.tokens.shape[1] for r in rolls.values())  # the MLX path may queue one more step
    same = (rolls[True].tokens[:, :width] == rolls[False].tokens[:, :width]).mean()
    assert same > 0.95, f"only {same:.0%} of tokens agree"


def test_numpy_sampler_follows_the_distribution():
    from grpo_mlx.sampler import host_pick

    logits = mx.log(mx.array([[0.1, 0.2, 0.3, 0.4]] * 4000))  # (n, 4)
    mx.random.seed(0)
    tok, lp, _ = host_pick(logits, 1.0)
    freq = np.bincount(tok, minlength=4) / tok.size
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.025)
    np.testing.assert_allclose(lp, np.log([0.1, 0.2, 0.3, 0.4])[tok], atol=1e-6)
    # the two-level search (blocks of 8 over 37 tokens) is the plain inverse CDF
    x = mx.random.normal((500, 37)) * 2
    u = np.random.default_rng(0).random(500)
    tok, lp, entropy = host_pick(x, 0.8, u, block=8)
    p = np.exp(np.array(x) / 0.8 - np.array(mx.logsumexp(x / 0.8, axis=1, keepdims=True)))  # (500, 37)
    np.testing.assert_array_equal(tok, (np.cumsum(p, axis=1) < u[:, None]).sum(axis=1))
    np.testing.assert_allclose(lp, np.log(p[np.arange(500), tok]), atol=1e-5)
    np.testing.assert_allclose(entropy, -(p * np.log(p)).sum(axis=1), atol=1e-4)


def test_finished_rows_leave_the_batch(model_and_tokenizer, monkeypatch):
    """Filtering ended rows out of the batch (and its cache) changes no completion."""
    import grpo_mlx.sampler as sampler

    model, tok = model_and_tokenizer
    prompts = chat_prompt_ids(tok, ["1+1", "12+34", "50+50", "3+4"])
    runs = {}
    for fraction in (0.01, 2.0):  # filter as soon as one row ends / never
        monkeypatch.setattr(sampler, "COMPACT_FRACTION", fraction)
        runs[fraction] = generate_groups(model, tok, prompts, 3, 8, temperature=0)
    assert runs[0.01].texts == runs[2.0].texts
    np.testing.assert_allclose(runs[0.01].logprobs, runs[2.0].logprobs, atol=1e-5)
    assert len(set(runs[0.01].lengths.tolist())) > 1, "the rows should end at different steps"


def test_other_cache_types_prefill_one_prompt_at_a_time():
    """A model with a sliding-window layer (RotatingKVCache) takes the per-prompt merge path;
    with a window wider than the text it equals full attention."""
    from mlx_lm.models import llama
    from mlx_lm.models.cache import KVCache

    from grpo_mlx.testing import NoStopTokenizer

    args = llama.ModelArgs.from_dict(
        dict(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
            rms_norm_eps=1e-5,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=64,
        )
    )
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    assert type(model.make_cache()[0]) is not KVCache
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]

    class Tok(NoStopTokenizer):
        eos_token_id = 0

    roll = generate_groups(model, Tok(), prompts, 2, 10, temperature=1.0)
    assert roll.tokens.shape == (6, 10)
    assert _teacher_forced_gap(model, Tok(), prompts, roll, 2, 1.0) < 1e-4


def test_rollout_reports_its_timing(model_and_tokenizer):
    model, tok = model_and_tokenizer
    roll = generate_groups(model, tok, chat_prompt_ids(tok, ["12+34"]), 2, 4)
    assert roll.prefill_time > 0 and roll.decode_time > 0 and 1 <= roll.decode_steps <= 4
