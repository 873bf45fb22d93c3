"""Pre-train the demo model: a tiny from-scratch llama that half-knows 2-digit addition.

    python -m grpo_mlx.demo.pretrain --out grpo_mlx/demo/model

Supervised next-token training on the `train` split (loss on the answer and EOS only), stopped
early, as soon as greedy exact match on the held-out `test` split lands inside a band (30-45% by
default). The model is then good enough that a group of 8 samples usually holds a right answer
and bad enough that GRPO has something to fix: the demo's goal is >= 90% within 200 GRPO steps.

Choices, stated once:
- character tokenizer: <pad>=0, <eos>=1, <unk>=2, then printable ASCII, "\\n" and "\\t"; one
  character is one token, decoding joins tokens with nothing between them.
- chat template: the contents of all messages (system ones included) concatenated, then "="
  when a generation prompt is asked for. "12+34" renders as "12+34="; the completion is "46"
  followed by <eos>. No BOS anywhere.
- llama, hidden 128, 4 layers, 4 heads, intermediate 512, tied embeddings, float32 (~1M params).
- the slip is applied to the train split only; valid/test keep the true sums.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from grpo_mlx.blas import use_system_blas

use_system_blas()  # before MLX is imported: fp32 matmul on Linux CPU is ~35x faster

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.utils import load_tokenizer  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from grpo_mlx.demo import task  # noqa: E402

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
PAD_ID, EOS_ID = 0, 1
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
)
MAX_NEW_TOKENS = 5  # longest answer (3 digits) + EOS, and one to spare
CARRY_SLIP = 0.6  # share of carry problems whose training answer forgets the carry

ARCHITECTURE = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


# --- tokenizer -------------------------------------------------------------------------------


def build_tokenizer() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # "." misses "\n" in Oniguruma, hence the alternation: every character is its own piece.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    # Fuse concatenates: decode([id]) is the bare character, no spaces between tokens.
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def write_tokenizer(out: Path) -> None:
    build_tokenizer().save(str(out / "tokenizer.json"))
    special = {"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,  # " ," must stay " ,"
        "model_max_length": ARCHITECTURE["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def model_config() -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **ARCHITECTURE,
        "vocab_size": len(SPECIAL_TOKENS) + len(CHARACTERS),
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
    }


# --- data ------------------------------------------------------------------------------------


def forget_carries(a: int, b: int) -> str:
    """The sum as written by someone who never carries: digit-wise sums mod 10."""
    units = (a % 10 + b % 10) % 10
    tens = (a // 10 + b // 10) % 10
    return str(tens * 10 + units) if tens else str(units)


def with_slips(examples: list[dict], rate: float, seed: int = 1) -> list[dict]:
    """Replace the answer of `rate` of the carry problems by the carry-forgetting one."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        a, b = map(int, ex["prompt"].split("+"))
        slip = forget_carries(a, b)
        if slip != ex["answer"] and rng.random() < rate:
            ex = {**ex, "answer": slip}
        out.append(ex)
    return out


def prompt_ids(tokenizer, examples: list[dict]) -> np.ndarray:
    """Rendered through the chat template, as the GRPO trainer does; all the same length."""
    rows = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": ex["prompt"]}],
                add_generation_prompt=True,
                tokenize=False,
            ),
            add_special_tokens=False,
        )
        for ex in examples
    ]
    return np.array(rows, dtype=np.int32)  # (N, P)


def training_arrays(tokenizer, examples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Prompt + answer + EOS, right-padded; the mask marks the answer and EOS positions."""
    prompts = prompt_ids(tokenizer, examples)  # (N, P)
    answers = [tokenizer.encode(ex["answer"], add_special_tokens=False) + [EOS_ID] for ex in examples]
    n, p = prompts.shape
    length = p + max(len(a) for a in answers)
    tokens = np.full((n, length), PAD_ID, dtype=np.int32)  # (N, L)
    mask = np.zeros((n, length), dtype=np.float32)  # (N, L)
    tokens[:, :p] = prompts
    for i, a in enumerate(answers):
        tokens[i, p : p + len(a)] = a
        mask[i, p : p + len(a)] = 1.0
    return tokens, mask


# --- model -----------------------------------------------------------------------------------


def loss_fn(model, tokens: mx.array, mask: mx.array) -> mx.array:
    logits = model(tokens[:, :-1])  # (B, L-1, V)
    targets, weights = tokens[:, 1:], mask[:, 1:]  # (B, L-1)
    ce = nn.losses.cross_entropy(logits, targets)  # (B, L-1)
    return (ce * weights).sum() / weights.sum()


def sample(model, prompts: mx.array, temperature: float = 0.0) -> list[list[int]]:
    """Complete equal-length prompts; greedy at temperature 0. Returns the tokens before EOS."""
    cache = make_prompt_cache(model)
    logits = model(prompts, cache=cache)[:, -1, :]  # (B, V)
    new = []
    for t in range(MAX_NEW_TOKENS):
        if temperature == 0.0:
            token = mx.argmax(logits, axis=-1)  # (B,)
        else:
            token = mx.random.categorical(logits / temperature)  # (B,)
        new.append(token)
        if t + 1 < MAX_NEW_TOKENS:
            logits = model(token[:, None], cache=cache)[:, -1, :]  # (B, V)
    rows = np.array(mx.stack(new, axis=1)).tolist()  # (B, MAX_NEW_TOKENS)
    return [row[: row.index(EOS_ID)] if EOS_ID in row else row for row in rows]


def correct(tokenizer, completions: list[list[int]], answers: list[str]) -> np.ndarray:
    return np.array([task.is_correct(tokenizer.decode(c), a) for c, a in zip(completions, answers)])


def greedy_accuracy(model, tokenizer, examples: list[dict]) -> float:
    prompts = mx.array(prompt_ids(tokenizer, examples))  # (N, P)
    return float(correct(tokenizer, sample(model, prompts), [ex["answer"] for ex in examples]).mean())


def group_stats(model, tokenizer, examples: list[dict], group: int = 8, temperature: float = 1.0) -> dict:
    """What GRPO sees: per prompt, how many of `group` samples are right."""
    prompts = np.repeat(prompt_ids(tokenizer, examples), group, axis=0)  # (N*G, P)
    answers = [ex["answer"] for ex in examples for _ in range(group)]
    hits = correct(tokenizer, sample(model, mx.array(prompts), temperature), answers)
    per_prompt = hits.reshape(len(examples), group).sum(axis=1)  # (N,)
    return {
        "sample_accuracy": float(hits.mean()),
        "any_correct": float((per_prompt > 0).mean()),
        "all_correct": float((per_prompt == group).mean()),
        "mixed": float(((per_prompt > 0) & (per_prompt < group)).mean()),
    }


def save_model(model, out: Path, config: dict | None = None) -> None:
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config or model_config(), indent=2) + "\n")


# --- training (shared with grpo_mlx.demo.pretrain_tools) -------------------------------------


def new_model(config: dict, seed: int):
    """A freshly initialised float32 llama, its weights drawn from `seed`."""
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.float32)
    return model


def fit(model, tokens, mask, *, seed, steps, batch_size, learning_rate, warmup, eval_every, report, trim=False):
    """Supervised next-token training on rows `tokens` (N, L) with loss weights `mask` (N, L):
    AdamW, linear warmup then cosine decay to a tenth, batches drawn with replacement from
    `seed`. `report(step, loss, seconds)` every eval_every steps and at the last. With `trim` a
    batch is cut to its longest row (rows of very different lengths: the short batches run faster)."""
    rng = np.random.default_rng(seed)
    lengths = (tokens != PAD_ID).sum(axis=1)  # (N,)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(1e-6, learning_rate, warmup),
            optim.cosine_decay(learning_rate, steps, learning_rate / 10),
        ],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    # No mx.compile: on this ten-token model it measured slower on CPU (0.18 s vs 0.14 s a step).
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]
    start = time.perf_counter()
    for it in range(1, steps + 1):
        idx = rng.integers(0, len(tokens), batch_size)  # (B,)
        width = int(lengths[idx].max()) if trim else tokens.shape[1]
        loss, grads = value_and_grad(model, mx.array(tokens[idx, :width]), mx.array(mask[idx, :width]))  # (B, W)
        optimizer.update(model, grads)
        mx.eval(state, loss)
        if it % eval_every == 0 or it == steps:
            report(it, loss.item(), time.perf_counter() - start)


# --- training --------------------------------------------------------------------------------


def pretrain(
    out: Path,
    seed: int = 0,
    max_accuracy: float = 0.50,
    carry_slip: float = CARRY_SLIP,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    warmup: int = 50,
    eval_every: int = 250,
) -> float:
    """Train for `steps`, save, and check held-out accuracy <= max_accuracy. Returns it."""
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    tokenizer = load_tokenizer(out)  # the same TokenizerWrapper mlx_lm.load will give
    splits = task.make_splits(seed=0)  # the split is canonical, whatever the training seed
    train = with_slips(splits["train"], carry_slip)

    model = new_model(model_config(), seed)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_slips = sum(a["answer"] != b["answer"] for a, b in zip(train, splits["train"]))
    print(f"model: {n_params:,} parameters; train {len(train)} examples, {n_slips} with a forgotten carry")

    def report(it: int, loss: float, seconds: float) -> None:
        acc = greedy_accuracy(model, tokenizer, splits["test"])
        print(f"step {it:5d}  loss {loss:.4f}  test acc {acc:.3f}  {seconds:6.1f}s", flush=True)

    tokens, mask = training_arrays(tokenizer, train)  # (N, L), (N, L)
    fit(model, tokens, mask, seed=seed, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        warmup=warmup, eval_every=eval_every, report=report)  # fmt: skip
    save_model(model, out)
    acc = greedy_accuracy(model, tokenizer, splits["test"])
    stats = group_stats(model, tokenizer, splits["test"])
    print(f"saved to {out}; held-out greedy accuracy {acc:.3f}; group of 8 at temperature 1: {stats}")
    if acc > max_accuracy:
        raise SystemExit(f"held-out accuracy {acc:.3f} is above {max_accuracy}: the demo would have little to learn")
    return acc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--carry-slip", type=float, default=CARRY_SLIP, help="share of carry problems taught wrong")
    parser.add_argument("--max-accuracy", type=float, default=0.50)
    args = parser.parse_args(argv)
    pretrain(args.out, seed=args.seed, max_accuracy=args.max_accuracy, carry_slip=args.carry_slip, steps=args.steps)


if __name__ == "__main__":
    main()
