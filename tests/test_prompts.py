import string

import pytest

from grpo_mlx.prompts import PromptError, encode_prompt, notes, prepare_examples, render_prompt, template_markers
from grpo_mlx.testing import CHATML, QWEN3_THINKING, THINKING_OPT_IN, build_bpe_tokenizer

# ---------------------------------------------------------------- fixtures


def make_tokenizer(chat_template=None, append_eos=False):
    """A character-level tokenizer (for exact ids) with <s> / </s>, built locally (no network)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars = list(string.printable)
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    single = "<s> $A </s>" if append_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        additional_special_tokens=specials[3:],
    )
    if chat_template:
        wrapped.chat_template = chat_template
    return wrapped


CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(PromptError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- the character tokenizer: the basic rules


def test_render_prompt_with_chat_template():
    tok = make_tokenizer(CHAT)
    assert render_prompt(tok, "2+2=") == "<s><|user|>2+2=\n<|assistant|>"
    assert (
        render_prompt(tok, "2+2=", system_prompt="Be brief.") == "<s><|system|>Be brief.\n<|user|>2+2=\n<|assistant|>"
    )
    messages = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}]
    # A system message in the data wins over the configured system prompt.
    assert render_prompt(tok, messages, system_prompt="Be brief.") == "<s><|system|>Mine.\n<|user|>hi\n<|assistant|>"


def test_render_prompt_template_without_system_role():
    tok = make_tokenizer(NO_SYSTEM)
    assert render_prompt(tok, "hi", system_prompt="Be brief.") == "<s><|user|>Be brief.\n\nhi\n<|assistant|>"


def test_render_prompt_without_chat_template():
    tok = make_tokenizer()
    assert render_prompt(tok, "12+34=") == "12+34="
    assert render_prompt(tok, "12+34=", system_prompt="Add.") == "Add.\n\n12+34="
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert render_prompt(tok, messages) == "a\nb\nc"


def test_encode_prompt_has_exactly_one_bos():
    bos = 1
    chat = make_tokenizer(CHAT)
    ids = encode_prompt(chat, render_prompt(chat, "hi"))
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1
    plain = make_tokenizer()
    ids = encode_prompt(plain, render_prompt(plain, "hi"))
    assert ids == [bos, plain.convert_tokens_to_ids("h"), plain.convert_tokens_to_ids("i")]
    # A tokenizer that appends EOS must not end the prompt with it.
    eos_adding = make_tokenizer(append_eos=True)
    assert eos_adding.encode("hi")[-1] == eos_adding.eos_token_id
    assert encode_prompt(eos_adding, "hi") == ids


def test_through_mlx_lm_tokenizer_wrapper():
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    wrapper = TokenizerWrapper(make_tokenizer(CHAT))
    text = render_prompt(wrapper, "hi", system_prompt="S")
    assert text == "<s><|system|>S\n<|user|>hi\n<|assistant|>"
    ids = encode_prompt(wrapper, text)
    assert ids.count(1) == 1 and ids[0] == 1
    assert render_prompt(TokenizerWrapper(make_tokenizer()), "hi", "S") == "S\n\nhi"


def test_prepare_examples_adds_fields_and_enforces_length():
    tok = make_tokenizer()
    examples = [{"prompt": "ab", "answer": "x", "k": 1}, {"prompt": "abcdef", "answer": "y"}]
    prepared = prepare_examples(examples, tok, max_prompt_length=7)
    assert prepared[0] == {
        "prompt": "ab",
        "answer": "x",
        "k": 1,
        "prompt_text": "ab",
        "prompt_ids": encode_prompt(tok, "ab"),
    }
    assert len(prepared[1]["prompt_ids"]) == 7  # BOS + 6 characters
    assert "prompt_text" not in examples[0]  # new dicts, inputs untouched
    message = error_of(prepare_examples, examples, tok, max_prompt_length=6)
    assert "example 1" in message and "7 tokens" in message and "6" in message


# ---------------------------------------------------------------- a byte-level BPE tokenizer with ChatML

QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def test_a_conversation_gets_the_template_with_the_generation_prompt():
    tok = build_bpe_tokenizer(CHATML)
    text = render_prompt(tok, QUESTION)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(tok, "What is 2+2?") == text  # a plain string is one user message


def test_a_final_assistant_message_is_continued_not_closed():
    tok = build_bpe_tokenizer(CHATML)
    started = QUESTION + [{"role": "assistant", "content": "Let me count: 2, then"}]
    text = render_prompt(tok, started)
    assert text.endswith("<|im_start|>assistant\nLet me count: 2, then")  # open: no <|im_end|>, no new turn
    assert text.count("<|im_start|>assistant") == 1
    [example] = prepare_examples([{"prompt": started}], tok)
    assert example["prompt_ids"] == tok.encode(text, add_special_tokens=False)
    assert example["prompt_ids"][-1] != tok.convert_tokens_to_ids("<|im_end|>")


def test_a_rendered_string_is_used_as_it_is_with_one_note():
    tok = build_bpe_tokenizer(CHATML)
    rendered = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert template_markers(tok) == ["<|im_end|>", "<|im_start|>"]
    assert render_prompt(tok, rendered) == rendered  # not wrapped in a second template
    examples = [{"prompt": rendered}, {"prompt": rendered}, {"prompt": "What is 3+3?"}]
    prepared = prepare_examples(examples, tok)
    assert prepared[0]["prompt_text"] == rendered
    assert prepared[2]["prompt_text"].startswith("<|im_start|>system\n")
    [note] = notes(examples, tok)
    assert "2 of 3 prompts" in note and "<|im_start|>" in note


def test_ignore_chat_template_uses_every_string_as_it_is():
    tok = build_bpe_tokenizer(CHATML)
    assert render_prompt(tok, "Q: 2+2?\nA:", ignore_chat_template=True) == "Q: 2+2?\nA:"
    assert render_prompt(tok, "Q: 2+2?", system_prompt="Be brief.", ignore_chat_template=True) == (
        "Be brief.\n\nQ: 2+2?"
    )
    # Conversations still get the template: a list of messages means a chat.
    assert render_prompt(tok, QUESTION, ignore_chat_template=True) == render_prompt(tok, QUESTION)
    examples = [{"prompt": "Q: 2+2?\nA:"}, {"prompt": QUESTION}]
    assert [e["prompt_text"] for e in prepare_examples(examples, tok, ignore_chat_template=True)][0] == "Q: 2+2?\nA:"
    assert any("--ignore-chat-template: 1 string prompts" in n for n in notes(examples, tok, True))
    assert notes(examples, tok, False) == []


def test_chat_template_kwargs_reach_the_template():
    tok = build_bpe_tokenizer(QWEN3_THINKING)
    off = render_prompt(tok, QUESTION, chat_template_kwargs={"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    [example] = prepare_examples([{"prompt": QUESTION}], tok, chat_template_kwargs={"enable_thinking": False})
    assert example["prompt_text"] == off
    assert render_prompt(tok, QUESTION).endswith("<|im_start|>assistant\n")  # thinking on by default


@pytest.mark.parametrize("template, think_tokens", [(QWEN3_THINKING, False), (THINKING_OPT_IN, True)])
def test_without_kwargs_the_template_defaults_apply_as_transformers_renders_them(template, think_tokens):
    """mlx-lm's TokenizerWrapper passes enable_thinking=<vocab has <think>> on its own, which
    turns Qwen3's default-on thinking off (no <think> token) or an opt-in one on: not here."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    hf = build_bpe_tokenizer(template, think_tokens=think_tokens)
    expected = hf.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert "<think>" not in expected
    assert render_prompt(TokenizerWrapper(hf), QUESTION) == expected
    assert render_prompt(TokenizerWrapper(hf), QUESTION, chat_template_kwargs={"enable_thinking": True}) == (
        hf.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    )


def test_a_model_without_a_template_gets_a_note():
    tok = build_bpe_tokenizer(chat_template=None)
    assert render_prompt(tok, QUESTION) == "What is 2+2?"
    [note] = notes([{"prompt": QUESTION}], tok, model="base-model")
    assert note == "base-model has no chat template: prompts are used as plain text"


def test_a_failing_template_names_the_example():
    tok = build_bpe_tokenizer("{{ raise_exception('only user turns') }}")
    message = error_of(prepare_examples, [{"prompt": "hi"}], tok)
    assert message.startswith("example 0 (0-based): the chat template failed") and "only user turns" in message
