"""Prompts -> the model's input text -> token ids. One rendering function, `render_prompt`, serves
training, `eval`, the TUI (it runs the trainer) and `train --dry-run`.

The rules, stated once (TRL and mlx-lm agree on the first two; on plain strings they differ):
- A conversation (a list of messages) gets the chat template with the generation prompt. One
  whose last message is the assistant's is continued, not closed (TRL's continue_final_message):
  no generation prompt, and the final message stays open for the model to go on.
- A string that already holds the template's special tokens (e.g. "<|im_start|>") was rendered
  by the user: it is used as it is.
- Any other string is one user message and gets the template (mlx-lm's rule, for instruct
  models); `ignore_chat_template` (mlx-lm's --ignore-chat-template) uses every string as it is
  (TRL's rule, for base models and R1-Zero-style prompts).
- `chat_template_kwargs` go to the template as they are; without them the template's own
  defaults apply, exactly as transformers renders them.
- Without a chat template, messages are plain text: system texts, a blank line, the rest.

No mlx / mlx_lm import here: the TUI and the dry-run import this module.
"""

from __future__ import annotations

from grpo_mlx.errors import UserError


class PromptError(UserError, ValueError):
    """A prompt that cannot be rendered or is too long, naming the example."""


def has_chat_template(tokenizer) -> bool:
    # mlx-lm's TokenizerWrapper knows of templates the HF tokenizer lacks (custom renderers).
    return bool(getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None))


def template_markers(tokenizer) -> list[str]:
    """The special tokens the chat template writes (e.g. <|im_start|>, <|im_end|>): a string
    holding one of them was rendered already. Only tokens that occur in the template count, so
    that a BOS/UNK text a template never writes does not make a plain prompt "rendered"."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return []
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials |= {str(t) for t in added.values() if getattr(t, "special", False)}
    return sorted(t for t in specials if len(t) > 1 and t in template)


def is_rendered(text: str, markers: list[str]) -> bool:
    return any(m in text for m in markers)


def _template_renderer(tokenizer):
    """What to call apply_chat_template on. mlx-lm's TokenizerWrapper adds enable_thinking=<has
    thinking tokens> whenever the caller does not pass it, overriding templates whose default
    differs; with no custom renderer of mlx-lm's own, the wrapped HF tokenizer renders exactly as
    transformers does."""
    inner = getattr(tokenizer, "_tokenizer", None)  # (an HF fast tokenizer's own is the Rust one)
    if hasattr(inner, "apply_chat_template") and getattr(tokenizer, "_chat_template", None) is None:
        return inner
    return tokenizer


def _apply(tokenizer, messages: list[dict], kwargs: dict) -> str:
    renderer = _template_renderer(tokenizer)
    if messages[-1]["role"] == "assistant":  # continue the final message, do not close it
        return renderer.apply_chat_template(messages, tokenize=False, continue_final_message=True, **kwargs)
    return renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def render_prompt(
    tokenizer,
    prompt,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
    ignore_chat_template: bool = False,
    markers: list[str] | None = None,
    tools: list[dict] | None = None,
) -> str:
    """The model's input text for a prompt (a string or a list of chat messages), by the rules
    in this module's docstring. `markers`: template_markers(tokenizer), computed once by callers
    that render many prompts. `tools`: the tools' JSON schemas, for the template to show the
    model (its `tools=` argument)."""
    templated = has_chat_template(tokenizer)
    if isinstance(prompt, str):
        if templated and is_rendered(prompt, template_markers(tokenizer) if markers is None else markers):
            return prompt
        if ignore_chat_template:
            templated = False
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    if not templated:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        body = "\n".join(m["content"] for m in messages if m["role"] != "system")
        return f"{system}\n\n{body}" if system else body
    kwargs = dict(chat_template_kwargs or {})
    if tools:
        kwargs["tools"] = tools  # only when set: stand-in tokenizers need not take the keyword
    try:
        return _apply(tokenizer, messages, kwargs)
    except Exception:
        # Some templates (e.g. Gemma 2) reject the system role: fold it into the first user
        # turn, which is what those models' authors recommend.
        if messages[0]["role"] != "system" or len(messages) < 2:
            raise
        system, first, *rest = messages
        merged = {**first, "content": system["content"] + "\n\n" + first["content"]}
        return _apply(tokenizer, [merged, *rest], kwargs)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt, with exactly one BOS where the tokenizer uses one."""
    bos = getattr(tokenizer, "bos_token", None)
    # Chat templates usually write the BOS text themselves; adding it again doubles it.
    add_special = not (bos and text.startswith(bos))
    ids = list(tokenizer.encode(text, add_special_tokens=add_special))
    eos = getattr(tokenizer, "eos_token", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if add_special and ids and eos_id is not None and ids[-1] == eos_id and not (eos and text.endswith(eos)):
        ids.pop()  # tokenizers that append EOS would end the prompt before the answer starts
    return ids


def options(cfg) -> dict:
    """prepare_examples' keywords from a TrainConfig: the one place that maps config to rendering."""
    return dict(
        system_prompt=cfg.system_prompt,
        max_prompt_length=cfg.max_prompt_length,
        chat_template_kwargs=cfg.chat_template_kwargs,
        ignore_chat_template=cfg.ignore_chat_template,
    )


def prepare_examples(
    examples: list[dict],
    tokenizer,
    system_prompt: str | None = None,
    max_prompt_length: int | None = None,
    *,
    chat_template_kwargs: dict | None = None,
    ignore_chat_template: bool = False,
    tools: list[dict] | None = None,
) -> list[dict]:
    """New examples with `prompt_text` and `prompt_ids` added (`tools`: schemas the template shows)."""
    markers = template_markers(tokenizer)
    prepared = []
    for index, example in enumerate(examples):
        try:
            text = render_prompt(
                tokenizer, example["prompt"], system_prompt, chat_template_kwargs, ignore_chat_template, markers, tools
            )
        except UserError:
            raise
        except Exception as error:  # a template's raise_exception or a jinja error, for this row
            raise PromptError(
                f"example {index} (0-based): the chat template failed: {type(error).__name__}: {error}"
            ) from None
        ids = encode_prompt(tokenizer, text)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise PromptError(
                f"example {index} (0-based): prompt is {len(ids)} tokens, over "
                f"max_prompt_length {max_prompt_length}; shorten it or raise "
                f"--max-prompt-length (prompts are never truncated): "
                f"{text[:60]!r}..."
            )
        prepared.append({**example, "prompt_text": text, "prompt_ids": ids})
    return prepared


def notes(examples: list[dict], tokenizer, ignore_chat_template: bool = False, model: str = "the model") -> list[str]:
    """What a user should know once per run about how their prompts were rendered."""
    if not has_chat_template(tokenizer):
        return [f"{model} has no chat template: prompts are used as plain text"]
    found = []
    strings = [ex["prompt"] for ex in examples if isinstance(ex.get("prompt"), str)]
    markers = template_markers(tokenizer)
    rendered = [s for s in strings if is_rendered(s, markers)]
    if rendered:
        shown = ", ".join(m for m in markers if any(m in s for s in rendered))
        found.append(
            f"{len(rendered)} of {len(examples)} prompts are strings already holding the chat template's "
            f"tokens ({shown}): used as they are, without the template"
        )
    if ignore_chat_template and len(strings) > len(rendered):
        found.append(
            f"--ignore-chat-template: {len(strings) - len(rendered)} string prompts are used as they are "
            "(conversations still get the template)"
        )
    return found
