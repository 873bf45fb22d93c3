"""`grpo-mlx fuse`: the fused model is the trained policy, as mlx-lm loads it, for a float base
and for a quantized one."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from grpo_mlx import cli
from grpo_mlx.batch import training_arrays
from grpo_mlx.config import DEMO_DATA, DEMO_MODEL, build_config
from grpo_mlx.logprobs import completion_logprobs
from grpo_mlx.policy import adapter_layers, add_adapters, load_model, save_adapters
from grpo_mlx.sampler import generate_groups
from grpo_mlx.trainer import Trainer

# (W + dW) x and W x + dW x round differently in float32. Measured against a float64 evaluation
# of the same weights, the policy and the fused model are each off by up to 7e-5 in a log-prob
# here (large adapters, 4 layers), and differ from each other by as much: the tolerance is float32
# rounding, not an approximation in the fusing.
FLOAT32_TOL = 1e-4


def train_adapters(tmp_path, **overrides) -> Trainer:
    """A short real run. Its learning rate is 3x the demo's: the adapters move the policy well
    away from the base (most greedy answers change) without wrecking it, as 1e-3 already does."""
    flags = dict(
        adapter_path=str(tmp_path / "run"),
        batch_size=4,
        group_size=4,
        iters=3,
        eval_limit=0,
        save_every=100,
        learning_rate=3e-4,
    )
    flags.update(overrides)
    trainer = Trainer(build_config(flags))
    trainer.run()
    trainer.model.eval()
    return trainer


def sequences(model, tokenizer, n_prompts=6):
    """Sampled [prompt | completion] rows to score teacher-forced: tokens, prompt lengths, mask."""
    texts = ["12+34", "55+66", "90+10", "47+38", "19+99", "70+21"][:n_prompts]
    prompts = [tokenizer.encode(t + "=", add_special_tokens=False) for t in texts]  # the chat template's rendering
    mx.random.seed(1)
    roll = generate_groups(model, tokenizer, prompts, 2, 6, temperature=1.0)
    return training_arrays(prompts, roll, 2, sorted(tokenizer.eos_token_ids)[0])


def logprobs(model, batch):
    tokens, lens, mask = batch
    return np.array(completion_logprobs(model, tokens, lens, mask.shape[1])) * np.array(mask)  # (N, T)


def load_fused(path):
    from mlx_lm import load

    return load(str(path))


def dtypes(model):
    return {p.dtype for _, p in tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_adapters(tmp_path_factory.mktemp("fuse"))


def test_fused_model_is_the_policy(trained, tmp_path, capsys):
    out = tmp_path / "fused"
    # --model is read from adapter_config.json
    assert cli.main(["fuse", "--adapter-path", str(trained.run_dir), "--save-path", str(out)]) == 0
    assert "mlx_lm.server --model" in capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith("adapter") for n in names)

    fused, tok = load_fused(out)
    params = dict(tree_flatten(fused.parameters()))
    assert not any("lora" in k for k in params), "a plain model: no adapter weights left"
    assert dtypes(fused) == {mx.float32}, "the demo base is float32, and so is the fused model"

    batch = sequences(trained.model, trained.tokenizer)
    policy = logprobs(trained.model, batch)
    np.testing.assert_allclose(logprobs(fused, batch), policy, rtol=0, atol=FLOAT32_TOL)
    base, _ = load_model(DEMO_MODEL)
    assert np.abs(logprobs(base, batch) - policy).max() > 1e-2, "the adapters changed the model"

    # a second fuse into the same place is refused, not overwritten
    assert cli.main(["fuse", "--adapter-path", str(trained.run_dir), "--save-path", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_fused_dtype_follows_the_base_or_the_flag(trained, tmp_path):
    from mlx_lm import convert

    from grpo_mlx.fuse import fuse_model

    bf16_base = tmp_path / "bf16"
    convert(hf_path=DEMO_MODEL, mlx_path=str(bf16_base), dtype="bfloat16")
    info = fuse_model(str(bf16_base), str(trained.run_dir), str(tmp_path / "a"))
    assert info["dtype"] == "bfloat16" and dtypes(load_fused(tmp_path / "a")[0]) == {mx.bfloat16}
    fuse_model(DEMO_MODEL, str(trained.run_dir), str(tmp_path / "b"), dtype="bfloat16")
    assert dtypes(load_fused(tmp_path / "b")[0]) == {mx.bfloat16}
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_quantized_base(tmp_path):
    """A 4-bit base: fused with --dequantize it is the policy (float32 arithmetic); fused and
    quantized again it stays 4-bit and is only as close to the policy as re-quantization allows."""
    from mlx_lm import convert

    from grpo_mlx.fuse import fuse_model

    q4 = tmp_path / "q4"
    convert(hf_path=DEMO_MODEL, mlx_path=str(q4), quantize=True, q_group_size=64, q_bits=4)
    # adapters made directly (as trained ones would be: QLoRA on the 4-bit base), clearly non-zero
    cfg = build_config({"model": str(q4), "data": DEMO_DATA, "num_layers": -1})
    policy, tok = load_model(str(q4))
    adapter_config = add_adapters(policy, cfg)
    mx.random.seed(0)
    for layer in adapter_layers(policy):
        layer.lora_b = 0.02 * mx.random.normal(layer.lora_b.shape)
    policy.eval()
    save_adapters(policy, adapter_config, tmp_path / "adapters")

    batch = sequences(policy, tok)
    expected = logprobs(policy, batch)

    fuse_model(str(q4), str(tmp_path / "adapters"), str(tmp_path / "deq"), dequantize=True)
    deq, _ = load_fused(tmp_path / "deq")
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in deq.named_modules())
    assert "quantization" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    np.testing.assert_allclose(logprobs(deq, batch), expected, rtol=0, atol=FLOAT32_TOL)

    # --model from adapter_config.json (the q4 path); the fused weights are quantized again
    assert cli.main(["fuse", "--adapter-path", str(tmp_path / "adapters"), "--save-path", str(tmp_path / "q")]) == 0
    fused_q, _ = load_fused(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    quantized = [m for _, m in fused_q.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(quantized) == 7 * 4 and all(m.bits == 4 and m.group_size == 64 for m in quantized)

    # Re-quantizing W + dW rounds each weight to the nearest of 16 levels of its group of 64: an
    # error of the same size as quantizing the base in the first place. So the 4-bit fused model
    # differs from the policy about as much as the 4-bit base differs from the float base (both
    # measured as mean |log-prob difference| over these tokens), and it keeps the adapters' effect:
    # it is much closer to the policy than the 4-bit base without adapters is.
    mask = np.array(batch[2]).astype(bool)
    requant_error = np.abs(logprobs(fused_q, batch) - expected)[mask].mean()
    base_q, _ = load_model(str(q4))
    base_f, _ = load_model(DEMO_MODEL)
    quant_error = np.abs(logprobs(base_q, batch) - logprobs(base_f, batch))[mask].mean()
    adapter_effect = np.abs(logprobs(base_q, batch) - expected)[mask].mean()
    assert requant_error < 3 * quant_error + 1e-3, (requant_error, quant_error)
    assert requant_error < 0.5 * adapter_effect, (requant_error, adapter_effect)


def test_fuse_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["fuse", "--adapter-path", str(tmp_path / "nope"), "--save-path", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
