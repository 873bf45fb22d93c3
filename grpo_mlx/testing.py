"""Fixtures the benchmark and the tests share: random-weight mlx-lm models of public shapes,
built in memory (nothing is downloaded), and a tokenizer whose stop token never comes.

No MLX import at module level: `grpo-mlx bench --help` stays fast.
"""

from __future__ import annotations

import json

from grpo_mlx.errors import UserError

# Random-weight models: (mlx-lm architecture, config). Shapes of the public models they are named after.
PRESETS: dict[str, tuple[str, dict]] = {
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            hidden_size=896,
            num_hidden_layers=24,
            intermediate_size=4864,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
        ),
    ),
    "qwen2.5-1.5b": (
        "qwen2",
        dict(
            hidden_size=1536,
            num_hidden_layers=28,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
        ),
    ),
    "qwen3-0.6b": (
        "qwen3",
        dict(
            hidden_size=1024,
            num_hidden_layers=28,
            intermediate_size=3072,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            tie_word_embeddings=True,
            max_position_embeddings=40960,
        ),
    ),
    "llama-3.2-1b": (
        "llama",
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            rms_norm_eps=1e-5,
            rope_theta=5e5,
            tie_word_embeddings=True,
        ),
    ),
    "smollm2-135m": (
        "llama",
        dict(
            hidden_size=576,
            num_hidden_layers=30,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            rms_norm_eps=1e-5,
            rope_theta=1e5,
            tie_word_embeddings=True,
        ),
    ),
    "tiny": (
        "llama",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=8192,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
    ),
}


class NoStopTokenizer:
    """A tokenizer stand-in whose stop token can never be sampled (so every completion runs to
    its token budget) and whose decoding is free (these benchmarks score no text)."""

    eos_token_ids: list = []

    def decode(self, ids) -> str:
        return ""


def build_random_model(spec: str):
    """A random-weight mlx-lm model from `NAME[:key=value,...]`."""
    import importlib

    import mlx.core as mx

    name, _, overrides = spec.partition(":")
    arch, config = PRESETS.get(name, (name, {}))
    config = dict(config)
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        config[key.strip()] = json.loads(value) if value.strip()[:1] in "-0123456789[{tf" else value
    try:
        module = importlib.import_module(f"mlx_lm.models.{arch}")
    except ImportError:
        raise UserError(
            f"--random {spec}: no preset or mlx-lm architecture named {arch!r} (presets: {', '.join(PRESETS)})"
        ) from None
    model = module.Model(module.ModelArgs.from_dict({"model_type": arch, **config}))
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is not None:  # logits with a trained model's spread (std ~3), not N(0, 1) embeddings' ~30
        embed.weight = embed.weight * (3.0 / config.get("hidden_size", 1) ** 0.5)
    mx.eval(model.parameters())
    return model, f"random {name} ({arch})"


# Chat templates of the two families a user meets most, reduced to what rendering depends on.
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's switch: thinking is on unless the caller passes enable_thinking=false.
QWEN3_THINKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# The opposite default (thinking only when asked), as some newer templates have it.
THINKING_OPT_IN = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}{% endif %}"
)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? The answer is 72.",
    "def add(a, b):\n    return a + b\nassert add(1, 2) == 3",
    "<think>\nWorking it out.\n</think>\n<answer>42</answer>",
]


def build_bpe_tokenizer(chat_template: str | None = CHATML, think_tokens: bool = False):
    """A byte-level BPE tokenizer (as Qwen, Llama 3 and GPT-2 use) with ChatML special tokens,
    trained in memory on a few sentences; `think_tokens` adds <think>/</think> as single tokens
    (which is what makes mlx-lm's wrapper treat a model as a thinking one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = CHATML_SPECIALS + (["<think>", "</think>"] if think_tokens else [])
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(BPE_CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:]
    )
    if chat_template:
        wrapped.chat_template = chat_template
    return wrapped


def save_tokenizer_dir(path, chat_template: str | None = CHATML, think_tokens: bool = False) -> str:
    """A model directory holding only tokenizer files: what `train --dry-run` needs of a model."""
    build_bpe_tokenizer(chat_template, think_tokens).save_pretrained(str(path))
    return str(path)


# A ChatML template with tools, in the shape of Qwen2.5's: mlx-lm infers the `json_tools`
# parser from it (it holds `<tool_call>` and `tool_call.name`).
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n"
    "{% endif %}# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Call a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- for tool_call in message.tool_calls or [] %}<tool_call>\n"
    '{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


def build_tool_tokenizer(path, corpus: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `corpus`, with ChatML special tokens and the tool
    template above, saved in `path` and loaded as mlx-lm loads a model's (a TokenizerWrapper
    with a tool parser)."""
    from pathlib import Path

    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (
        corpus
        or [
            "What is 12 + 30? <tool_call>\n",
            '{"name": "calculator", "arguments": {"expression": "12 + 30"}}\n</tool_call>',
            "<tool_response>\n42\n</tool_response> The answer is 42. system user assistant Tools tools",
            "Evaluate an arithmetic expression. numbers parentheses function description parameters type string",
        ]
        * 4
    )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TOOL_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TOOL_CHAT_TEMPLATE
    )
    path = Path(path)
    fast.save_pretrained(str(path))
    return load_tokenizer(path)


def chat_prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as a one-message user conversation with the generation prompt."""
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for t in texts
    ]
