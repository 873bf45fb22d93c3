"""grpo_mlx.cpu_kernels: the arithmetic exp / SwiGLU and their installation into a model."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from grpo_mlx import cpu_kernels
from grpo_mlx.batch import training_arrays
from grpo_mlx.config import DEMO_MODEL
from grpo_mlx.logprobs import completion_logprobs
from grpo_mlx.policy import load_model, prepare_for_cpu
from grpo_mlx.sampler import generate_groups


def test_exp_is_as_accurate_as_float32_allows():
    x = np.linspace(-87, 88, 400_001, dtype=np.float32)
    got = np.asarray(cpu_kernels.exp(mx.array(x)), dtype=np.float64)
    rel = np.abs(got / np.exp(x.astype(np.float64)) - 1)
    assert rel.max() < 2.5e-7  # float32 has 6e-8 relative precision; mx.exp is off by up to 9e-7
    ends = np.asarray(cpu_kernels.exp(mx.array([-np.inf, -1e4, 0.0, 1.0, 1e4, np.inf], dtype=mx.float32)))
    assert ends[2] == 1.0 and abs(ends[3] - np.e) < 3e-7
    assert 0 < ends[0] == ends[1] < 2e-38 and np.isfinite(ends[4]) and ends[4] == ends[5] > 1e38


def test_swiglu_and_its_gradient_match_mlx_lm():
    gate = mx.random.normal((16, 300), key=mx.random.key(1)) * 4
    up = mx.random.normal((16, 300), key=mx.random.key(2))
    np.testing.assert_allclose(
        np.asarray(cpu_kernels.swiglu(gate, up)), np.asarray(mlx_lm_swiglu(gate, up)), rtol=2e-6, atol=1e-6
    )

    def grads(fn):
        return mx.grad(lambda g, u: (fn(g, u) * mx.arange(300)).sum(), argnums=(0, 1))(gate, up)

    for ours, theirs in zip(grads(cpu_kernels.swiglu), grads(mlx_lm_swiglu)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-3)


def test_install_switches_the_demo_mlps_and_standard_switches_them_back():
    model, _ = load_model(DEMO_MODEL)
    model.set_dtype(mx.float32)
    tokens = mx.array([[5, 6, 7, 8, 9, 10, 11]])
    before = model(tokens)
    classes = [type(layer.mlp) for layer in model.layers]
    assert cpu_kernels.install(model) == len(model.layers) == 4
    assert all(type(layer.mlp) is not cls and isinstance(layer.mlp, cls) for layer, cls in zip(model.layers, classes))
    after = model(tokens)
    assert 0 < mx.abs(after - before).max().item() < 1e-4  # a different function, to float32 rounding
    with cpu_kernels.standard(model):
        assert [type(layer.mlp) for layer in model.layers] == classes
        assert mx.array_equal(model(tokens), before)
    assert mx.array_equal(model(tokens), after)
    assert cpu_kernels.install(model) == 0, "installing twice changes nothing"


def test_install_leaves_an_mlp_of_another_form_alone():
    class GeluMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

        def __call__(self, x):
            return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlps = [GeluMLP(), GeluMLP()]

    net = Net()
    assert cpu_kernels.install(net) == 0
    assert all(type(m) is GeluMLP for m in net.mlps)


@pytest.mark.parametrize("host", [True, False])
def test_sampler_logprobs_match_the_training_pass_with_the_kernels(host):
    model, tok = load_model(DEMO_MODEL)
    prepare_for_cpu(model)
    assert any(hasattr(type(layer.mlp), "_grpo_standard_class") for layer in model.layers)
    prompts = [tok.encode("12+34=", add_special_tokens=False), tok.encode("7+8=", add_special_tokens=False)]
    mx.random.seed(0)
    roll = generate_groups(model, tok, prompts, 3, 6, temperature=1.0, host_sampling=host)
    tokens, lens, mask = training_arrays(prompts, roll, 3, 1)
    T = roll.tokens.shape[1]
    lp = np.asarray(completion_logprobs(model, tokens, lens, mask.shape[1]))[:, :T]
    assert np.abs(np.where(roll.mask, lp - roll.logprobs, 0)).max() < 1e-4
