"""Datasets: rows on disk or on the Hub -> examples {prompt, answer, other columns}.

Choices, stated once:
- A split's files are found by the Hub's layouts, on the Hub and in a local directory alike:
  `{split}.jsonl`, `data/{split}-*.jsonl` shards, `{split}.json`, `{split}.parquet`,
  `data/{split}-*.parquet` shards, or `{config}/{split}-*.parquet` for one config of a
  multi-config dataset (--data-config). One file (.jsonl, .json, .parquet) is the train split
  only. A `data` that is no local path is a Hub dataset id.
- Every example is the row with the user's columns copied onto `prompt` and `answer`; the
  original columns stay too, since reward functions receive every column by its own name.
- The answer column is optional for a whole file but not per row: if any row has it, every
  row must (a row silently lacking its key would score as wrong). Without it, `answer` is None;
  a non-default --answer-key that no row has is an error (a typo, not a choice).
- Errors name `file:line` (1-based; `file:row N` for JSON lists and parquet) and the key.
- Hub datasets (listing, the cache offline, downloads) are grpo_mlx.hub_datasets; rendering
  prompts into token ids is grpo_mlx.prompts.

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
        return read_parquet(path)
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


def read_parquet(path: Path) -> list[tuple[str, dict]]:
    """Rows of a parquet file, read a record batch at a time (a Hub shard can be gigabytes of
    columns; one batch of Python dicts at a time keeps the peak near the rows themselves)."""
    require_pyarrow(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            rows += [(f"{path}:row {len(rows) + i}", row) for i, row in enumerate(batch.to_pylist(), start=1)]
    except (pa.ArrowException, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: not a readable parquet file ({first})") from None
    return rows


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
        example = dict(row)  # the original columns stay: reward functions ask for them by name
        for key, target in ((prompt_key, "prompt"), (answer_key, "answer")):
            if key != target and key in example:
                if target in example:  # mapping would silently replace the row's own column
                    raise DataError(
                        f"{where}: has both '{key}' and '{target}'; '{key}' cannot be mapped onto '{target}'"
                    )
                example[target] = example[key]
        example.setdefault("answer", None)
        examples.append(example)
    return examples


# ---------------------------------------------------------------- splits


def load_split(
    data: str,
    split: str,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    required: bool = True,
    config: str | None = None,
) -> list[dict]:
    """Examples of one split (train / valid / test) from a directory, one file or the Hub.

    `config`: one config of a multi-config dataset. Returns [] for an absent split when not required."""
    path = Path(data).expanduser()
    if path.is_dir():
        listing = [p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file()]
        files = split_files(listing, split, config, where=str(path))
        if not files:
            if not required:
                return []
            present = sorted(p.name for p in path.iterdir()) or ["nothing"]
            raise DataError(
                f"{path}: no {split} split (looked for {split}.jsonl, {split}.json, {split}.parquet "
                f"and data/{split}-*.parquet shards); the directory has: {', '.join(present)}"
            )
        rows = [row for name in files for row in read_rows(path / name)]
        path = path / files[0] if len(files) == 1 else path  # name the empty file itself
    elif path.is_file():
        if split != "train":  # one file is the training data, never silently also the test set
            if required:
                raise DataError(
                    f"{path}: a single file is the train split only; for a {split} "
                    f"split pass a directory with {split}.jsonl or {split}.parquet"
                )
            return []
        rows = read_rows(path)
    elif HUB_ID.match(data) and path.suffix not in (".jsonl", ".json", ".parquet"):
        from grpo_mlx.hub_datasets import load_hub_dataset

        return load_hub_dataset(
            data, split, prompt_key=prompt_key, answer_key=answer_key, required=required, config=config
        )
    else:
        raise DataError(f"{data}: no such file or directory (nor a Hugging Face dataset id owner/name)")
    examples = to_examples(rows, prompt_key, answer_key)
    if not examples and required:
        raise DataError(f"{path}: no examples (the {split} split is empty)")
    return examples


def held_out_examples(cfg) -> tuple[list[dict], str | None]:
    """The held-out examples a run scores (its eval_split, else valid, else test; at most
    eval_limit of them) and the split they came from."""
    if cfg.eval_limit <= 0:
        return [], None
    for split in dict.fromkeys([cfg.eval_split, "valid", "test"]):
        found = load_split(
            cfg.data, split, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, required=False,
            config=cfg.data_config,
        )  # fmt: skip
        if found:
            return found[: cfg.eval_limit], split
    return [], None


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def configs_of(filenames: list[str]) -> list[str]:
    """The config names a dataset's layout shows: folders holding data files (`main/...`,
    `data/main/...`), the Hub's own `data/` folder aside."""
    found = set()
    for f in filenames:
        parts = f.split("/")
        if f.endswith(DATA_SUFFIXES) and len(parts) >= 2:
            folders = [p for p in parts[:-1] if p != "data"]
            if folders:
                found.add(folders[0])
    return sorted(found)


def split_files(filenames: list[str], split: str, config: str | None, where: str) -> list[str]:
    """The files holding `split` (the Hub's "validation" for "valid"), within one config."""
    if config is not None:
        inside = {}
        for f in filenames:
            parts = f.split("/")
            if config in parts[:-1]:
                inside["/".join(parts[parts.index(config) + 1 :])] = f
        if not inside and config != "default":
            shown = ", ".join(configs_of(filenames)) or "none (one config only: leave --data-config out)"
            raise DataError(f"{where}: no config '{config}' (--data-config); the configs there: {shown}")
        if inside:
            filenames = list(inside)
        mapping = inside or {f: f for f in filenames}
    else:
        mapping = {f: f for f in filenames}
    for name in HUB_SPLIT_NAMES.get(split, [split]):
        found = pick_split_files(filenames, name, where)
        if found:
            return [mapping[f] for f in found]
    return []


def pick_split_files(filenames: list[str], split: str, where: str = "the dataset") -> list[str]:
    """The files of a dataset that hold `split`, by the common layouts, in order.

    The first layout that matches wins; shards of one layout come back sorted."""
    layouts = [
        [f"{split}.jsonl", f"data/{split}.jsonl"],
        [f"data/{split}-*.jsonl", f"{split}-*.jsonl"],
        [f"{split}.json", f"data/{split}.json"],
        [f"{split}.parquet", f"data/{split}.parquet", f"data/{split}-*.parquet", f"{split}-*.parquet"],
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
            f"{where}: the {split} split exists in several configs ({', '.join(by_config)}); "
            f"pick one with --data-config {next(iter(by_config))}"
        )
    return by_config.get("default") or next(iter(by_config.values()), [])


# ---------------------------------------------------------------- token ids


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
