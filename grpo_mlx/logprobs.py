"""Teacher-forced log-probabilities of completion tokens, at logits / temperature.

The sampler draws from logits / temperature, so every training log-probability (policy, old,
reference) is computed from the same tempered distribution. The lm-head is applied to a chunk of
rows at a time, so the (N, T, V) logits of a batch never exist at once.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def token_logprobs_from_logits(logits, targets, temperature=1.0):
    """log_softmax(logits / temperature) at `targets`, in float32, never building the
    full (N, T, V) log-softmax.

    logits (N, T, V), targets (N, T) int → (N, T). The sampler draws from logits / temperature,
    so the training log-probabilities must use the same tempered distribution.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.astype(mx.float32)  # (N, T, V)
    if temperature != 1.0:
        scaled = scaled / temperature  # (N, T, V)
    log_norm = mx.logsumexp(scaled, axis=-1)  # (N, T)
    picked = mx.take_along_axis(scaled, targets[..., None], axis=-1).squeeze(-1)  # (N, T)
    return picked - log_norm  # (N, T)


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


def chunked_token_logprobs(
    head, hidden, targets, temperature: float = 1.0, vocab_size: int = 0, chunk_bytes: int = LOGPROB_CHUNK_BYTES
):
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


def completion_logprobs(
    model,
    tokens,
    prompt_lens,
    completion_len: int,
    temperature: float = 1.0,
    chunk_bytes: int = LOGPROB_CHUNK_BYTES,
    entropy: str | None = None,
):
    """Teacher-forced log-probabilities of the completion tokens at logits / temperature.

    tokens: (N, L) int, each row [prompt | completion | padding] (right-padded, so positions
    need no mask); prompt_lens: (N,) int. Returns (N, T) with T = completion_len: entry (n, t)
    is log p(tokens[n, p_n + t] | tokens[n, :p_n + t]).

    The transformer body runs once over all positions; only the T completion positions of each
    row go through the lm-head, in chunks of rows (chunked_token_logprobs), so the (N, T, V)
    logits are never materialised. Models that cannot be split run whole.

    entropy: None, "value" (the per-token entropy too, without gradient: the entropy mask),
    returning (logp, entropy), or "grad" (with its gradient: the entropy bonus), returning
    (logp, entropy, the same entropies without gradient); all (N, T), from one body pass.
    """
    from grpo_mlx.entropy import chunked_token_entropy, token_entropy_from_logits

    positions = prompt_lens[:, None] - 1 + mx.arange(completion_len)[None]  # (N, T)
    positions = mx.minimum(positions, tokens.shape[1] - 2)  # padded tail; masked by the caller
    targets = mx.take_along_axis(tokens, positions + 1, axis=1)  # (N, T)
    split = lm_head_split(model)
    if split is None:
        logits = model(tokens[:, :-1])  # (N, L-1, V)
        logits = mx.take_along_axis(logits, positions[..., None], axis=1)  # (N, T, V)
        logp = token_logprobs_from_logits(logits, targets, temperature)  # (N, T)
        if entropy is None:
            return logp
        ent = token_entropy_from_logits(logits, temperature)  # (N, T)
        return (logp, ent, mx.stop_gradient(ent)) if entropy == "grad" else (logp, mx.stop_gradient(ent))
    body, head = split
    hidden = body(tokens[:, :-1])  # (N, L-1, D)
    hidden = mx.take_along_axis(hidden, positions[..., None], axis=1)  # (N, T, D)
    logp = chunked_token_logprobs(head, hidden, targets, temperature, model._grpo_vocab, chunk_bytes)  # (N, T)
    if entropy is None:
        return logp
    ent = chunked_token_entropy(
        head, hidden, temperature, model._grpo_vocab, chunk_bytes, differentiable=entropy == "grad"
    )  # (N, T), or that and its value
    return (logp, *ent) if entropy == "grad" else (logp, ent)
