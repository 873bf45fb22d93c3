"""Adapters on quantized bases (QLoRA) and DoRA, gradient accumulation, top-k sampling."""

import json

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx import cpu_kernels
from grpo_mlx.batch import training_arrays
from grpo_mlx.config import DEMO_DATA, DEMO_MODEL, build_config
from grpo_mlx.logprobs import completion_logprobs
from grpo_mlx.policy import adapters_disabled, load_model, prepare_for_cpu
from grpo_mlx.sampler import generate_groups
from grpo_mlx.trainer import Trainer


def config(tmp_path, **kw):
    flags = dict(
        model=DEMO_MODEL,
        data=DEMO_DATA,
        adapter_path=str(tmp_path / "run"),
        batch_size=4,
        group_size=4,
        iters=2,
        eval_limit=0,
        num_layers=-1,
        max_completion_length=8,
        learning_rate=2e-2,
    )
    flags.update(kw)
    return build_config(flags)


def fixed_batch(trainer):
    prompts = [ex["prompt_ids"] for ex in trainer.train_examples[:4]]
    mx.random.seed(3)
    roll = generate_groups(trainer.model, trainer.tokenizer, prompts, 2, 6)
    return training_arrays(prompts, roll, 2, trainer.pad_id)


def logprobs(model, batch):
    tokens, lens, mask = batch
    return np.array(completion_logprobs(model, tokens, lens, mask.shape[1])) * np.array(mask)


@pytest.fixture(scope="module")
def quantized_model(tmp_path_factory):
    from mlx_lm import convert

    path = tmp_path_factory.mktemp("q") / "demo-4bit"
    convert(hf_path=DEMO_MODEL, mlx_path=str(path), quantize=True, q_group_size=64, q_bits=4)
    assert json.loads((path / "config.json").read_text())["quantization"]["bits"] == 4
    return str(path)


def policy_reference_base(trainer, base_path):
    """Log-probs of a fixed batch under the trained policy, under the same model with its
    adapters off, and under the base loaded afresh as grpo-mlx runs it: (batch, policy, ref, base)."""
    batch = fixed_batch(trainer)
    trainer.model.eval()
    policy = logprobs(trainer.model, batch)
    with adapters_disabled(trainer.model):
        ref = logprobs(trainer.model, batch)
    base, _ = load_model(base_path)
    prepare_for_cpu(base)
    return batch, policy, ref, logprobs(base, batch)


def test_qlora_trains_and_reference_is_the_quantized_base(tmp_path, quantized_model):
    import mlx.nn as nn
    from mlx_lm import load

    trainer = Trainer(config(tmp_path, model=quantized_model))
    trainer.run()
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in trainer.model.named_modules()), "the base stays quantized"
    batch, policy, ref, base = policy_reference_base(trainer, quantized_model)
    assert np.array_equal(ref, base)
    assert np.abs(policy - ref).max() > 1e-3
    loaded, _ = load(quantized_model, adapter_path=str(trainer.run_dir))
    loaded.set_dtype(mx.float32)
    with cpu_kernels.standard(trainer.model):  # mlx-lm's own code on both sides
        policy = logprobs(trainer.model, batch)
    np.testing.assert_allclose(logprobs(loaded, batch), policy, atol=1e-5)


def test_dora_trains_and_its_reference_is_the_base(tmp_path):
    trainer = Trainer(config(tmp_path, fine_tune_type="dora"))
    trainer.run()
    assert json.loads((trainer.run_dir / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    batch, policy, ref, base = policy_reference_base(trainer, DEMO_MODEL)
    # DoRA's base needs magnitude/norm, which is 1 only up to rounding: equal to float precision
    np.testing.assert_allclose(ref, base, atol=1e-5)
    assert np.abs(policy - ref).max() > 1e-3
    np.testing.assert_array_equal(logprobs(trainer.model, batch), policy)  # restored after the block


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_matches_one_batch(tmp_path, loss_type):
    """Micro-batches must give the whole batch's gradient (Adam would hide a scale error in the
    weights, so compare the gradient norm before clipping, and the loss)."""
    from grpo_mlx.events import read_jsonl

    runs = {}
    for k in (1, 4):
        t = Trainer(
            config(
                tmp_path / str(k),
                iters=1,
                loss_type=loss_type,
                gradient_accumulation_steps=k,
                reward_functions=["accuracy", "length"],
            )
        )
        t.run()
        runs[k] = [e["metrics"] for e in read_jsonl(str(t.run_dir / "metrics.jsonl")) if e["type"] == "step"][0]
    assert runs[1]["grad_norm"] > 0
    if loss_type != "bnpo":  # bnpo normalises each micro-batch by its own token count, as TRL does
        assert runs[4]["grad_norm"] == pytest.approx(runs[1]["grad_norm"], rel=1e-4)
        assert runs[4]["loss"] == pytest.approx(runs[1]["loss"], rel=1e-4, abs=1e-7)


def test_top_k_one_is_greedy():
    model, tok = load_model(DEMO_MODEL)
    model.set_dtype(mx.float32)
    prompts = [tok.encode("12+34=", add_special_tokens=False), tok.encode("57+68=", add_special_tokens=False)]
    greedy = generate_groups(model, tok, prompts, 1, 5, temperature=0)
    mx.random.seed(0)
    top1 = generate_groups(model, tok, prompts, 3, 5, temperature=1.5, top_k=1)
    assert top1.texts == [t for t in greedy.texts for _ in range(3)]


def test_lora_keys_matching_no_layer_are_refused_with_the_layer_names():
    from grpo_mlx.policy import AdapterKeyError, add_adapters

    model, _ = load_model(DEMO_MODEL)
    cfg = build_config({"lora_keys": ["self_attn.q_proj", "self_attn.query"]})
    with pytest.raises(AdapterKeyError) as e:
        add_adapters(model, cfg)
    assert "'self_attn.query'" in str(e.value) and "self_attn.q_proj" in str(e.value) and "mlp.up_proj" in str(e.value)
