"""The group sampler on the real demo model: shared prefill, per-row stopping, log-probs."""

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx.config import DEMO_MODEL
from grpo_mlx.policy import completion_logprobs, load_model
from grpo_mlx.sampler import generate_groups
from grpo_mlx.trainer import training_arrays


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tok = load_model(DEMO_MODEL)
    model.set_dtype(mx.float32)
    return model, tok


def _prompts(tok, texts):
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False) for t in texts]


def test_shapes_eos_kept_and_finish_reasons(model_and_tokenizer):
    model, tok = model_and_tokenizer
    mx.random.seed(0)
    prompts = _prompts(tok, ["12+34", "55+66", "90+10"])
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
        assert np.all(roll.logprobs[i, roll.lengths[i]:] == 0)


def test_length_limit_reports_length(model_and_tokenizer):
    model, tok = model_and_tokenizer
    roll = generate_groups(model, tok, _prompts(tok, ["12+34"]), group_size=3, max_tokens=1)
    # a sum has at least two digits, so one token can never reach EOS
    assert roll.finish_reasons == ["length"] * 3 and list(roll.lengths) == [1, 1, 1]


def test_sampled_logprobs_match_teacher_forcing(model_and_tokenizer):
    model, tok = model_and_tokenizer
    mx.random.seed(1)
    prompts = _prompts(tok, ["12+34", "7+5", "99+99"])  # different prompt lengths
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
    roll = generate_groups(model, tok, _prompts(tok, ["47+38"]), group_size=16, max_tokens=5, temperature=1.5)
    assert len(set(roll.texts)) > 1, "16 samples at temperature 1.5 should not all be equal"


def test_greedy_is_deterministic_and_matches_single_row(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = _prompts(tok, ["12+34", "5+6", "80+19"])
    a = generate_groups(model, tok, prompts, group_size=2, max_tokens=6, temperature=0)
    b = generate_groups(model, tok, prompts[1:2], group_size=1, max_tokens=6, temperature=0)
    assert a.texts[2] == a.texts[3] == b.texts[0]
    assert a.texts[0] == a.texts[1]


def test_stop_strings_end_rows(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = _prompts(tok, ["12+34"])
    greedy = generate_groups(model, tok, prompts, group_size=1, max_tokens=6, temperature=0)
    first_char = greedy.texts[0][0]
    roll = generate_groups(model, tok, prompts, group_size=2, max_tokens=6, temperature=0, stop=[first_char], stop_check_every=1)
    assert roll.texts == [first_char, first_char]
    assert roll.finish_reasons == ["stop", "stop"] and list(roll.lengths) == [1, 1]
