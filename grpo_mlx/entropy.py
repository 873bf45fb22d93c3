"""Per-token entropy of the tempered policy, H = −Σ_v p_v log p_v, from the hidden states
through a linear lm-head, a chunk of rows at a time (never the (N, T, V) logits at once).

Used by the objective's entropy options: top_entropy_quantile (a mask: no gradient needed) and
entropy_coef (a bonus: the gradient is needed). With x = logits / T and p = softmax(x),
dH/dx = −p ⊙ (log p + H), so dH/dlogits = −p ⊙ (log p + H) / T per row; like
logprobs.chunked_token_logprobs, each chunk's gradient with respect to its hidden rows is formed
in the forward pass, so the backward pass only scales stored (rows, D) arrays.

The training pass (logprobs.completion_logprobs with entropy=...) runs the transformer body
once and hands the same hidden states to both chunked passes: the head is projected a second
time, one extra (rows, D)·(D, V) matmul per chunk and no memory beyond one chunk. Merging the
two chunk passes ([d logp/dh | dH/dh | logp | H] from one projection) would save that matmul.
"""

from __future__ import annotations

import mlx.core as mx

# As the log-probability pass: the float32 logits of one chunk stay under this many bytes.
ENTROPY_CHUNK_BYTES = 64 * 2**20


def _chunk_entropy(x):
    """Entropy of each row of tempered logits x (R, V) float32, and p, log p for the gradient."""
    top = x.max(axis=-1, keepdims=True)  # (R, 1)
    e = mx.exp(x - top)  # (R, V)
    total = e.sum(axis=-1, keepdims=True)  # (R, 1)
    log_p = x - top - mx.log(total)  # (R, V)
    p = e / total  # (R, V)
    h = -(p * log_p).sum(axis=-1, keepdims=True)  # (R, 1)
    return h, p, log_p


def token_entropy_from_logits(logits, temperature: float = 1.0):
    """Entropy of softmax(logits / temperature) over the last axis, float32, with its gradient:
    the path for models whose lm-head cannot be split off. (..., V) -> (...)."""
    x = logits.astype(mx.float32) / temperature  # (..., V)
    log_p = x - mx.logsumexp(x, axis=-1, keepdims=True)  # (..., V)
    return -(mx.exp(log_p) * log_p).sum(axis=-1)  # (...)


def chunked_token_entropy(
    head,
    hidden,
    temperature: float = 1.0,
    vocab_size: int = 0,
    chunk_bytes: int = ENTROPY_CHUNK_BYTES,
    *,
    differentiable: bool = False,
):
    """Entropy of softmax(head(hidden) / temperature) per row, in float32.

    hidden (N, T, D) → (N, T). differentiable=False (enough for top_entropy_quantile's mask)
    returns a value with no gradient and skips the head's transpose; True (entropy_coef)
    returns (entropy carrying dH/dhidden, exact, through the head's vjp; the same values
    without gradient). Anything else derived from the entropies (a metric, a mask) must use
    the second: inside mx.compile + value_and_grad over an mlx-lm model, MLX 0.32 failed
    ("_Map_base::at") on an auxiliary output that depends on the differentiable one (seen with
    the demo model; test_variants' entropy_coef case trains through that path). No gradient reaches the head's
    own weights (a frozen base head, as in the log-probability pass).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    N, T, D = hidden.shape
    rows = N * T
    chunk = max(16, chunk_bytes // (4 * max(vocab_size, 1)))
    inv_temp = 1.0 / temperature

    def chunk_pass(h):
        """[dH/dh | H] of a chunk of rows (or [H] without the gradient)."""
        logits = head(h)  # (R, V)
        ent, p, log_p = _chunk_entropy(logits.astype(mx.float32) * inv_temp)  # (R, 1), (R, V), (R, V)
        if not differentiable:
            return ent  # (R, 1)
        dlogits = -p * (log_p + ent) * inv_temp  # (R, V) dH/dlogits
        _, (dh,) = mx.vjp(head, [h], [dlogits.astype(logits.dtype)])  # (R, D)
        return mx.concatenate([dh.astype(mx.float32), ent], axis=1)  # (R, D + 1)

    flat_h = hidden.reshape(rows, D)  # (N*T, D)
    parts = []
    for i in range(0, rows, chunk):
        h = mx.stop_gradient(flat_h[i : i + chunk])  # (R, D)
        if parts:  # one chunk after another: MLX would otherwise start them all at once
            h = mx.depends(h, parts[-1])
        parts.append(chunk_pass(h))
    both = mx.concatenate(parts)  # (N*T, D + 1) or (N*T, 1), no gradient
    value = both[:, -1].reshape(N, T)  # (N, T)
    if not differentiable:
        return value
    dh = both[:, :D]  # (N*T, D)
    # the value is the entropy exactly (a − a == 0); the gradient with respect to hidden is dh
    linear = (flat_h * dh.astype(flat_h.dtype)).sum(axis=-1)  # (N*T,)
    ent = value + (linear - mx.stop_gradient(linear)).astype(mx.float32).reshape(N, T)  # (N, T)
    return ent, value
