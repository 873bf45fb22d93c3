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
from mlx.utils import tree_flatten

from grpo_mlx.loss import token_logprobs_from_logits
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
    """On the CPU device: float32 weights (the CPU backend has a fast BLAS path only for
    float32, shared/DESIGN.md §4) and the arithmetic SwiGLU of grpo_mlx.cpu_kernels (MLX's CPU
    exp is slow). Nothing on a GPU."""
    if on_cpu():
        from grpo_mlx import cpu_kernels

        model.set_dtype(mx.float32)
        cpu_kernels.install(model)


def add_adapters(model: nn.Module, cfg) -> dict:
    """Freeze the base model and add LoRA/DoRA layers through mlx-lm; return the
    `adapter_config.json` contents that mlx-lm's `load_adapters` understands."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    prepare_for_cpu(model)
    model.freeze()
    num_layers = len(model.layers) if cfg.num_layers == -1 else min(cfg.num_layers, len(model.layers))
    lora_parameters = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout}
    if cfg.lora_keys:
        lora_parameters["keys"] = list(cfg.lora_keys)
    linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=cfg.fine_tune_type == "dora")
    if getattr(cfg, "grad_checkpoint", False):
        checkpoint_blocks(model)
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if n_trainable == 0:
        raise ValueError(f"no adapter parameters were created (lora_keys={cfg.lora_keys}); check the keys")
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

        def __call__(self, *args, **kwargs):
            return nn.utils.checkpoint(self, super(sub, self).__call__)(*args, **kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "_grpo_checkpointed": True})
        _CHECKPOINTED[cls] = sub
    return _CHECKPOINTED[cls]


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


@contextlib.contextmanager
def adapters_replaced(model: nn.Module, weights: dict):
    """Run the model with other adapter weights (e.g. a snapshot), restoring its own after."""
    own = dict(tree_flatten(model.trainable_parameters()))
    model.load_weights(list(weights.items()), strict=False)
    try:
        yield model
    finally:
        model.load_weights(list(own.items()), strict=False)


# The float32 logits of one chunk of rows in the log-probability pass stay under this many
# bytes: 110 rows at a time for a 152k vocabulary instead of all N*T rows (64 x 512 rows would be
# 20 GB). MLX's CPU backend dispatches about a hundred operations ahead of the ones running,
# so several chunks are alive at once: small chunks keep that window small too.
LOGPROB_CHUNK_BYTES = 64 * 2**20


def lm_head_split(model: nn.Module):
    """(body, head) with head(body(tokens)) == model(tokens), or None.

    mlx-lm models keep the transformer in `model.model` and project with `model.lm_head` or the
    tied embedding's `as_linear`. Whether the model adds nothing after that (soft-capping or
    scaling logits would) is checked once on a short input, in eval mode, and remembered on the
    model. The check cannot run inside mx.compile or a gradient transform; there the answer is
    None (the caller falls back to the whole model) until an eager call has made it: the
    sampler's prefill, which runs before every training pass, is one.
    """
    known = getattr(model, "_grpo_vocab", None)  # vocabulary size once checked, 0 = no split
    body = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        head = getattr(getattr(body, "embed_tokens", None), "as_linear", None)
    elif tree_flatten(head.trainable_parameters()):
        head = None  # the fused pass below gives no gradient to the head's own weights
    if known == 0 or not isinstance(body, nn.Module) or head is None:
        return None
    if known is None:
        training = model.training
        model.eval()  # no dropout in the comparison
        try:
            x = mx.array([[0, 1, 2, 3]])
            whole, split = model(x), head(body(x))  # (1, 4, V)
            same = whole.shape == split.shape and bool(mx.allclose(whole, split, rtol=1e-5, atol=1e-5).item())
        except ValueError:  # evaluating inside a transform: decide later
            return None
        except Exception:
            same = False
        finally:
            model.train(training)
        model._grpo_vocab = int(whole.shape[-1]) if same else 0
        if not same:
            return None
    return body, head


def chunked_token_logprobs(head, hidden, targets, temperature: float = 1.0, vocab_size: int = 0,
                           chunk_bytes: int = LOGPROB_CHUNK_BYTES):
    """token_logprobs_from_logits(head(hidden), targets, temperature) for a linear `head`,
    projecting a chunk of rows at a time.

    Each chunk's logits are reduced to the log-probabilities and, in the same pass, to their
    gradient with respect to the chunk's hidden states ((onehot - softmax) / T through the
    head's transpose): log p of row i depends on hidden row i only, so the backward pass just
    scales these stored (rows, D) gradients by the incoming cotangents. Neither pass keeps any
    (rows, V) array, and the exponentials are computed once, where a checkpointed chunk would
    compute them three times. A forward-only call (the reference pass) pays one extra matmul.

    hidden (N, T, D), targets (N, T) int -> (N, T) float32.
    """
    N, T, D = hidden.shape
    rows = N * T
    chunk = max(16, chunk_bytes // (4 * max(vocab_size, 1)))
    inv_temp = 1.0 / temperature

    def chunk_pass(h, tgt):
        """[d logp / d h | logp] of a chunk of rows: one array, so that nothing of the chunk
        is still needed once it is computed."""
        logits = head(h)  # (R, V)
        x = logits.astype(mx.float32) * inv_temp  # (R, V)
        top = x.max(axis=-1, keepdims=True)  # (R, 1)
        e = mx.exp(x - top)  # (R, V)
        total = e.sum(axis=-1, keepdims=True)  # (R, 1)
        logp = mx.take_along_axis(x, tgt[:, None], axis=-1) - top - mx.log(total)  # (R, 1)
        onehot = mx.arange(x.shape[-1])[None] == tgt[:, None]  # (R, V)
        dlogits = (onehot.astype(mx.float32) - e / total) * inv_temp  # (R, V) d logp / d logits
        _, (dh,) = mx.vjp(head, [h], [dlogits.astype(logits.dtype)])  # (R, D)
        return mx.concatenate([dh.astype(mx.float32), logp], axis=1)  # (R, D + 1)

    flat_h = hidden.reshape(rows, D)  # (N*T, D)
    flat_t = targets.reshape(rows)  # (N*T,)
    parts = []
    for i in range(0, rows, chunk):
        h = mx.stop_gradient(flat_h[i : i + chunk])  # (R, D)
        if parts:  # one chunk after another: MLX would otherwise start them all at once
            h = mx.depends(h, parts[-1])
        parts.append(chunk_pass(h, flat_t[i : i + chunk]))
    both = mx.concatenate(parts)  # (N*T, D + 1), no gradient
    dh, logp = both[:, :D], both[:, D]  # (N*T, D), (N*T,)
    # the value is logp exactly (a - a == 0); the gradient with respect to the hidden states is dh
    linear = (flat_h * dh.astype(flat_h.dtype)).sum(axis=-1)  # (N*T,)
    logp = logp + (linear - mx.stop_gradient(linear)).astype(mx.float32)  # (N*T,)
    return logp.reshape(N, T)  # (N, T)


def completion_logprobs(model, tokens, prompt_lens, completion_len: int, temperature: float = 1.0,
                        chunk_bytes: int = LOGPROB_CHUNK_BYTES):
    """Teacher-forced log-probabilities of the completion tokens at logits / temperature.

    tokens: (N, L) int, each row [prompt | completion | padding] (right-padded, so positions
    need no mask); prompt_lens: (N,) int. Returns (N, T) with T = completion_len: entry (n, t)
    is log p(tokens[n, p_n + t] | tokens[n, :p_n + t]).

    The transformer body runs once over all positions; only the T completion positions of each
    row go through the lm-head, in chunks of rows (chunked_token_logprobs), so the (N, T, V)
    logits are never materialised. Models that cannot be split run whole.
    """
    positions = prompt_lens[:, None] - 1 + mx.arange(completion_len)[None]  # (N, T)
    positions = mx.minimum(positions, tokens.shape[1] - 2)  # padded tail; masked by the caller
    targets = mx.take_along_axis(tokens, positions + 1, axis=1)  # (N, T)
    split = lm_head_split(model)
    if split is None:
        logits = model(tokens[:, :-1])  # (N, L-1, V)
        logits = mx.take_along_axis(logits, positions[..., None], axis=1)  # (N, T, V)
        return token_logprobs_from_logits(logits, targets, temperature)  # (N, T)
    body, head = split
    hidden = body(tokens[:, :-1])  # (N, L-1, D)
    hidden = mx.take_along_axis(hidden, positions[..., None], axis=1)  # (N, T, D)
    return chunked_token_logprobs(head, hidden, targets, temperature, model._grpo_vocab, chunk_bytes)  # (N, T)


def save_adapters(model: nn.Module, adapter_config: dict, directory: str | os.PathLike) -> None:
    """Write adapters.safetensors + adapter_config.json into `directory` (non-atomic; the
    checkpoint module makes it atomic by writing into a fresh directory first)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(directory / "adapters.safetensors"), weights, metadata={"format": "mlx"})
    with open(directory / "adapter_config.json", "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2)
