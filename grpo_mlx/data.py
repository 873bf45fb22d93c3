"""Datasets and prompt formatting: rows on disk or on the Hub -> examples -> prompt token ids.

Choices, stated once:
- A split is a JSONL file: `{data}/{split}.jsonl`, or `data` itself when it is one `.jsonl`
  file (then it is the train split only). A `data` that is no local path is a Hub dataset id.
- Every example is the row with the user's columns renamed onto `prompt` and `answer`; all
  other columns stay as they are, since reward functions receive them as keyword arguments.
- The answer column is optional for a whole file but not per row: if any row has it, every
  row must (a row silently lacking its key would score as wrong). Without it, `answer` is None;
  a non-default --answer-key that no row has is an error (a typo, not a choice).
- Errors name `file:line` (1-based; `file:row N` for JSON lists and parquet) and the key.
- Prompts are never truncated: a prompt over the limit is an error, not a silently cut task.

This module must import fast (the TUI imports it), so no mlx / mlx_lm / huggingface_hub here
at module level.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from grpo_mlx.errors import UserError

ROLES = ("system", "user", "assistant")
HUB_ID = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")  # owner/name; "./x" or "x/y.jsonl" are paths
HUB_SPLIT_NAMES = {"valid": ["valid", "validation"]}  # the Hub's usual name for mlx-lm's "valid"


class DataError(UserError, ValueError):
    """A problem with the data, with a message naming the file, line and key."""


# ---------------------------------------------------------------- reading rows


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """Rows of a JSON-lines file, each with its `file:line` for error messages."""
    rows = []
    raw_lines = path.read_bytes().split(b"\n")
    if raw_lines and raw_lines[0].startswith(b"\xef\xbb\xbf"):  # editors on Windows add a BOM
        raw_lines[0] = raw_lines[0][3:]
    for number, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} "
                f"at column {error.start + 1}); save the file as UTF-8"
            ) from None
        if not line.strip():
            continue  # a blank line (often the last one) is layout, not data
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((where, row))
    return rows


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """Rows of a .jsonl, .json (JSON lines or one JSON list) or .parquet file."""
    if path.suffix == ".parquet":
        require_pyarrow(path)
        import pyarrow.parquet as pq

        return [(f"{path}:row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist(), start=1)]
    if path.suffix == ".json":
        try:
            whole = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            whole = None  # not one JSON document: read it as JSON lines for precise errors
        if isinstance(whole, list):
            for i, row in enumerate(whole, start=1):
                if not isinstance(row, dict):
                    raise DataError(f"{path}:row {i}: expected a JSON object, got {type(row).__name__}")
            return [(f"{path}:row {i}", row) for i, row in enumerate(whole, start=1)]
    return read_jsonl(path)


def require_pyarrow(path) -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow; pip install pyarrow") from None


# ---------------------------------------------------------------- rows -> examples


def check_prompt(prompt, where: str, key: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: key '{key}' is an empty string")
        return
    if not isinstance(prompt, list) or not prompt:
        raise DataError(
            f"{where}: key '{key}' must be a non-empty string or a list of chat "
            f'messages {{"role", "content"}}, got {type(prompt).__name__}'
        )
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f"{where}: key '{key}' message {i} must be an object with "
                f"'role' and 'content', got {json.dumps(message)[:80]}"
            )
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: key '{key}' message {i} has role {message['role']!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: key '{key}' message {i} content must be a string, got {type(message['content']).__name__}"
            )


def check_answer(answer, where: str, key: str) -> None:
    """An answer is a string or a number, or a list of them meaning "any of these"; an object
    has no answer to compare against (its Python repr would never match)."""

    def scalar(v) -> bool:
        return v is None or isinstance(v, (str, int, float))

    if isinstance(answer, list):
        if not answer:
            raise DataError(f"{where}: key '{key}' is an empty list; give one answer or a list of accepted answers")
        bad = [v for v in answer if not scalar(v) or v is None]
        if bad:
            raise DataError(
                f"{where}: key '{key}' lists {type(bad[0]).__name__} {bad[0]!r:.40}; a list of "
                "answers may hold only strings and numbers (any of them counts as right)"
            )
    elif not scalar(answer):
        raise DataError(
            f"{where}: key '{key}' is a {type(answer).__name__} ({answer!r:.60}); an answer is a "
            "string, a number, or a list of accepted answers"
        )


def to_examples(rows: list[tuple[str, dict]], prompt_key: str, answer_key: str) -> list[dict]:
    """Validate rows and rename the user's columns onto `prompt` / `answer`."""
    hint = "map columns with --prompt-key/--answer-key"
    has_answer = any(answer_key in row for _, row in rows)
    if rows and not has_answer and answer_key != "answer":
        # A column the user named explicitly is never optional: its absence is a typo.
        raise DataError(
            f"{rows[0][0]}: missing key '{answer_key}' (no row has it; keys "
            f"present: {', '.join(rows[0][1]) or 'none'}); {hint}"
        )
    examples = []
    for where, row in rows:
        if prompt_key not in row:
            raise DataError(f"{where}: missing key '{prompt_key}' (keys present: {', '.join(row) or 'none'}); {hint}")
        if has_answer and answer_key not in row:
            raise DataError(
                f"{where}: missing key '{answer_key}' (other rows have it; keys present: {', '.join(row)}); {hint}"
            )
        check_prompt(row[prompt_key], where, prompt_key)
        if answer_key in row:
            check_answer(row[answer_key], where, answer_key)
        example = dict(row)
        for key, target in ((prompt_key, "prompt"), (answer_key, "answer")):
            if key != target and key in example:
                if target in example:  # renaming would silently drop the row's own column
                    raise DataError(
                        f"{where}: has both '{key}' and '{target}'; '{key}' cannot be mapped onto '{target}'"
                    )
                example[target] = example.pop(key)
        example.setdefault("answer", None)
        examples.append(example)
    return examples


# ---------------------------------------------------------------- splits


def load_split(
    data: str, split: str, *, prompt_key: str = "prompt", answer_key: str = "answer", required: bool = True
) -> list[dict]:
    """Examples of one split (train / valid / test) from a directory, a .jsonl file or the Hub.

    Returns [] for an absent split when not required."""
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / f"{split}.jsonl"
        if not path.is_file():
            if not required:
                return []
            present = sorted(p.name for p in path.parent.iterdir()) or ["nothing"]
            raise DataError(f"{path}: no {split} split; the directory has: {', '.join(present)}")
    elif path.is_file():
        if split != "train":  # one file is the training data, never silently also the test set
            if required:
                raise DataError(
                    f"{path}: a single file is the train split only; for a {split} "
                    f"split pass a directory with {split}.jsonl"
                )
            return []
    elif HUB_ID.match(data) and path.suffix not in (".jsonl", ".json", ".parquet"):
        return load_hub_dataset(data, split, prompt_key=prompt_key, answer_key=answer_key, required=required)
    else:
        raise DataError(f"{data}: no such file or directory (nor a Hub dataset id owner/name)")
    examples = to_examples(read_rows(path), prompt_key, answer_key)
    if not examples and required:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def pick_split_files(filenames: list[str], split: str) -> list[str]:
    """The files of a Hub dataset repo that hold `split`, by the common layouts, in order.

    The first layout that matches wins; shards of one layout come back sorted."""
    layouts = [
        [f"{split}.jsonl", f"data/{split}.jsonl"],
        [f"data/{split}-*.jsonl", f"{split}-*.jsonl"],
        [f"{split}.json", f"data/{split}.json"],
        [f"{split}.parquet", f"data/{split}.parquet", f"data/{split}-*.parquet"],
    ]
    for patterns in layouts:
        found = sorted(f for f in filenames if any(fnmatch.fnmatch(f, p) for p in patterns))
        if found:
            return found
    # Parquet per config: {config}/{split}-*.parquet. One config, or the one called "default".
    by_config: dict[str, list[str]] = {}
    for f in sorted(filenames):
        parts = f.split("/")
        if len(parts) == 2 and fnmatch.fnmatch(parts[1], f"{split}-*.parquet"):
            by_config.setdefault(parts[0], []).append(f)
    if len(by_config) > 1 and "default" not in by_config:
        raise DataError(
            f"the {split} split exists in several configs ({', '.join(by_config)}); "
            f"download one and pass its files as a local --data directory"
        )
    return by_config.get("default") or next(iter(by_config.values()), [])


def load_hub_dataset(
    repo_id: str, split: str, *, prompt_key: str = "prompt", answer_key: str = "answer", required: bool = True
) -> list[dict]:
    """Examples of one split of a Hugging Face Hub dataset (downloaded into the HF cache)."""
    import huggingface_hub

    hint = (
        "offline? Set HF_HUB_OFFLINE=1 to use the cache only, or pass a local --data "
        "directory; private? run `hf auth login`"
    )
    try:
        filenames = huggingface_hub.HfApi().list_repo_files(repo_id, repo_type="dataset")
    except Exception as error:
        # Listing needs the network; a dataset downloaded before still loads from the cache.
        try:
            cached = Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
            filenames = [p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()]
        except Exception:
            raise DataError(
                f"Hub dataset '{repo_id}' (no local path of that name either): {type(error).__name__}: {error}; {hint}"
            ) from None
    files: list[str] = []
    for name in HUB_SPLIT_NAMES.get(split, [split]):
        files = pick_split_files(filenames, name)
        if files:
            break
    if not files:
        if not required:
            return []
        shown = ", ".join(sorted(filenames)[:20]) + (" ..." if len(filenames) > 20 else "")
        raise DataError(
            f"Hub dataset '{repo_id}': no files for the {split} split "
            f"(looked for {split}.jsonl, data/{split}-*.jsonl, {split}.json, "
            f"parquet); the repo has: {shown}"
        )
    if any(f.endswith(".parquet") for f in files):
        require_pyarrow(f"{repo_id}/{files[0]}")  # before downloading gigabytes we cannot read
    rows = []
    for filename in files:
        try:
            local = huggingface_hub.hf_hub_download(repo_id, filename, repo_type="dataset")
        except Exception as error:
            raise DataError(
                f"Hub dataset '{repo_id}': downloading {filename} failed: {type(error).__name__}: {error}; {hint}"
            ) from None
        rows += read_rows(Path(local))
    examples = to_examples(rows, prompt_key, answer_key)
    if not examples and required:
        raise DataError(f"Hub dataset '{repo_id}': the {split} split has no examples")
    return examples


# ---------------------------------------------------------------- prompts -> token ids


def has_chat_template(tokenizer) -> bool:
    # mlx-lm's TokenizerWrapper knows of templates the HF tokenizer lacks (custom renderers).
    return bool(getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt, system_prompt: str | None = None, tools: list[dict] | None = None) -> str:
    """The model's input text for a prompt (a string or a list of chat messages).

    With a chat template: the template with the generation prompt appended; a string prompt is
    one user message, and `system_prompt` is prepended unless a system message is there.
    Without one (base models): the system texts, a blank line, then the other messages'
    contents joined by newlines; a plain string prompt is used as it is. `tools`: the tools'
    JSON schemas, for the template to show the model (its `tools=` argument)."""
    extra = {"tools": tools} if tools else {}  # stand-in tokenizers need not take the keyword
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    if has_chat_template(tokenizer):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        except Exception:
            # Some templates (e.g. Gemma 2) reject the system role: fold it into the first
            # user turn, which is what those models' authors recommend.
            if messages[0]["role"] != "system" or len(messages) < 2:
                raise
            system, first, *rest = messages
            merged = {**first, "content": system["content"] + "\n\n" + first["content"]}
            return tokenizer.apply_chat_template([merged, *rest], add_generation_prompt=True, tokenize=False, **extra)
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    body = "\n".join(m["content"] for m in messages if m["role"] != "system")
    return f"{system}\n\n{body}" if system else body


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a formatted prompt, with exactly one BOS where the tokenizer uses one."""
    bos = getattr(tokenizer, "bos_token", None)
    # Chat templates usually write the BOS text themselves; adding it again doubles it.
    add_special = not (bos and text.startswith(bos))
    ids = list(tokenizer.encode(text, add_special_tokens=add_special))
    eos = getattr(tokenizer, "eos_token", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if add_special and ids and eos_id is not None and ids[-1] == eos_id and not (eos and text.endswith(eos)):
        ids.pop()  # tokenizers that append EOS would end the prompt before the answer starts
    return ids


def check_token_ids(examples: list[dict], vocab_size: int | None, tokenizer=None, source: str = "data") -> None:
    """Refuse prompt token ids the model has no embedding for (a tokenizer that does not belong
    to the model), once at setup instead of as garbage or a crash in the first step."""
    if not vocab_size:
        return
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [])
    if eos and eos[-1] >= vocab_size:
        raise DataError(
            f"the tokenizer's end-of-sequence id {eos[-1]} is outside the model's vocabulary of "
            f"{vocab_size} tokens; the tokenizer does not belong to this model"
        )
    for index, example in enumerate(examples):
        ids = example.get("prompt_ids") or []
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise DataError(
                f"{source}: example {index} (0-based) has token id {bad[0]}, outside the model's "
                f"vocabulary of {vocab_size} tokens; the tokenizer does not belong to this model"
            )


def prepare_examples(
    examples: list[dict],
    tokenizer,
    system_prompt: str | None = None,
    max_prompt_length: int | None = None,
    tools: list[dict] | None = None,
) -> list[dict]:
    """New examples with `prompt_text` and `prompt_ids` added (`tools`: schemas the template shows)."""
    prepared = []
    for index, example in enumerate(examples):
        text = format_prompt(tokenizer, example["prompt"], system_prompt, tools)
        ids = encode_prompt(tokenizer, text)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise DataError(
                f"example {index} (0-based): prompt is {len(ids)} tokens, over "
                f"max_prompt_length {max_prompt_length}; shorten it or raise "
                f"--max-prompt-length (prompts are never truncated): "
                f"{text[:60]!r}..."
            )
        prepared.append({**example, "prompt_text": text, "prompt_ids": ids})
    return prepared
