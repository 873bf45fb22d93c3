"""The policy: an mlx-lm model with LoRA/DoRA adapters, its reference, and teacher-forced
log-probabilities.

The reference policy for the KL term is the same model with its adapters switched off
(`adapters_disabled`), never a second copy. Adapter files are mlx-lm's own format, so
`mlx_lm.load(model, adapter_path=run_dir)` loads what we write.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from grpo_mlx.errors import UserError


class ModelLoadError(UserError, RuntimeError):
    """The model path or repo id does not give an mlx-lm model."""


def load_model(path_or_repo: str):
    """mlx_lm.load with the failure modes a user meets turned into one clear sentence."""
    from mlx_lm import load

    local = Path(path_or_repo).expanduser()
    looks_local = local.exists() or path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") > 1
    if looks_local:
        if not local.exists():
            raise ModelLoadError(f"model path does not exist: {path_or_repo}")
        if not (local / "config.json").exists():
            raise ModelLoadError(f"{path_or_repo} is not a model directory (no config.json in it)")
    try:
        model, tokenizer = load(str(local) if looks_local else path_or_repo)
    except Exception as e:  # mlx-lm raises a mix of types for bad dirs, bad ids and no network
        hint = "" if looks_local else " (a Hugging Face repo id; is the network or the HF cache available?)"
        raise ModelLoadError(f"cannot load model '{path_or_repo}'{hint}: {type(e).__name__}: {e}") from None
    return model, tokenizer


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def prepare_for_cpu(model: nn.Module) -> None:
    """On the CPU device: float32 weights (the CPU backend has a fast BLAS path only for float32;
    bf16/fp16 matmuls there run at about 4 GFLOP/s) and the arithmetic SwiGLU of
    grpo_mlx.cpu_kernels (MLX's CPU exp is slow). Nothing on a GPU."""
    if on_cpu():
        from grpo_mlx import cpu_kernels

        model.set_dtype(mx.float32)
        cpu_kernels.install(model)


class AdapterKeyError(UserError, ValueError):
    """`lora_keys` names a layer the model does not have."""


def adaptable_names(model: nn.Module, num_layers: int) -> tuple[list[str], list[str]]:
    """Names of the layers mlx-lm can put adapters on: inside the adapted blocks (as
    `self_attn.q_proj`) and anywhere in the model (as `lm_head`)."""
    kinds = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)

    def names(module) -> set[str]:
        return {k for k, m in module.named_modules() if k and (isinstance(m, kinds) or hasattr(m, "to_lora"))}

    inside: set[str] = set()
    for block in model.layers[len(model.layers) - num_layers :]:
        inside |= names(block)
    return sorted(inside), sorted(names(model))


def check_lora_keys(model: nn.Module, keys, num_layers: int, model_name) -> None:
    """A key that matches no layer would be skipped without a word by mlx-lm: refuse it."""
    inside, anywhere = adaptable_names(model, num_layers)
    for key in keys:
        if key not in inside and key not in anywhere:
            raise AdapterKeyError(
                f"'lora_keys' = {key!r} matches no layer of {model_name}; its linear "
                f"layers inside a block are: {', '.join(inside)}"
            )


def model_vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's embedding (the ids it can read), from its config."""
    size = getattr(getattr(model, "args", None), "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def add_adapters(model: nn.Module, cfg) -> dict:
    """Freeze the base model and add LoRA/DoRA layers through mlx-lm; return the
    `adapter_config.json` contents that mlx-lm's `load_adapters` understands."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    prepare_for_cpu(model)
    model.freeze()
    num_layers = len(model.layers) if cfg.num_layers == -1 else min(cfg.num_layers, len(model.layers))
    lora_parameters = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout}
    if cfg.lora_keys:
        check_lora_keys(model, cfg.lora_keys, num_layers, cfg.model)
        lora_parameters["keys"] = list(cfg.lora_keys)
    linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=cfg.fine_tune_type == "dora")
    if getattr(cfg, "grad_checkpoint", False):
        checkpoint_blocks(model)
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if n_trainable == 0:
        raise AdapterKeyError(f"'lora_keys' = {cfg.lora_keys!r}: no adapter parameters were created; check the keys")
    return {
        "model": cfg.model,
        "fine_tune_type": cfg.fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": lora_parameters,
    }


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing: each transformer block recomputes its activations in the backward
    pass instead of keeping them from the forward one (nn.utils.checkpoint, which differentiates
    the block's adapters too). Each block's class is swapped for a subclass, per instance, so
    parameter names, adapter files and other models of the same class are untouched."""
    for block in model.layers:
        block.__class__ = _checkpointed_class(type(block))


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if getattr(cls, "_grpo_checkpointed", False):
        return cls
    if cls not in _CHECKPOINTED:

        def __call__(self, x, *args, **kwargs):
            return checkpointed_call(self, super(sub, self).__call__, x, *args, **kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "_grpo_checkpointed": True})
        _CHECKPOINTED[cls] = sub
    return _CHECKPOINTED[cls]


def checkpointed_call(block: nn.Module, call, x, *args, **kwargs):
    """call(x, *args) whose backward pass recomputes the block's activations once the cotangent
    arrives. mx.checkpoint (MLX 0.32) makes the recomputation wait for the block's output only,
    which exists right after the forward pass: the recomputations of every block then run ahead
    of the backward pass and all their activations are alive at once (measured: the update's
    peak rose by 8% instead of falling). Here it waits for the cotangent, so one block's
    activations exist at a time."""

    flat = tree_flatten(block.trainable_parameters())  # empty for a block without adapters
    names, values = [k for k, _ in flat], [v for _, v in flat]

    def forward(params, h):
        block.update(params)
        return call(h, *args, **kwargs)

    def forward_flat(h, *arrays):  # mx.vjp takes a list of arrays
        return forward(tree_unflatten(list(zip(names, arrays))), h)

    fn = mx.custom_function(forward)

    @fn.vjp
    def backward(primals, cotangent, output):
        params, h = primals
        h = mx.depends(h, cotangent)  # recompute only when the gradient reaches this block
        _, grads = mx.vjp(forward_flat, [h, *(dict(tree_flatten(params))[n] for n in names)], [cotangent])
        return tree_unflatten(list(zip(names, grads[1:]))), grads[0]

    return fn(tree_unflatten(list(zip(names, values))), x)


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: every adapter's scale set to 0 (exact for LoRA). For DoRA the
    magnitude is also set to the base weight's row norms, which makes the layer the base layer.
    Python floats are baked into the graph when it is built, so build the reference graph
    inside this block; evaluating it later is fine. Never inside mx.compile."""
    saved = []
    for layer in adapter_layers(model):
        saved.append((layer, layer.scale, getattr(layer, "m", None)))
        layer.scale = 0.0
        if getattr(layer, "m", None) is not None and hasattr(layer, "_dequantized_weight"):
            layer.m = mx.linalg.norm(layer._dequantized_weight().astype(mx.float32), axis=1)
    try:
        yield model
    finally:
        for layer, scale, m in saved:
            layer.scale = scale
            if m is not None:
                layer.m = m


def snapshot_adapters(model: nn.Module) -> dict:
    """A copy of the adapters' current weights (iterative GRPO's reference), evaluated."""
    weights = {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    mx.eval(weights)
    return weights


@contextlib.contextmanager
def adapters_replaced(model: nn.Module, weights: dict):
    """Run the model with other adapter weights (e.g. a snapshot), restoring its own after."""
    own = dict(tree_flatten(model.trainable_parameters()))
    model.load_weights(list(weights.items()), strict=False)
    try:
        yield model
    finally:
        model.load_weights(list(own.items()), strict=False)


def save_adapters(model: nn.Module, adapter_config: dict, directory: str | os.PathLike) -> None:
    """Write adapters.safetensors + adapter_config.json into `directory` (non-atomic; the
    checkpoint module makes it atomic by writing into a fresh directory first)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(directory / "adapters.safetensors"), weights, metadata={"format": "mlx"})
    with open(directory / "adapter_config.json", "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2)
