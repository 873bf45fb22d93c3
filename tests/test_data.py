import json
import sys

import pytest

from grpo_mlx.data import DataError, load_split, pick_split_files

# ---------------------------------------------------------------- fixtures


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- local loading


def test_directory_of_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}])
    write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "3+3=", "answer": "6"}])
    assert load_split(str(tmp_path), "train") == [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    assert load_split(str(tmp_path), "valid") == [{"prompt": "3+3=", "answer": "6"}]
    assert load_split(str(tmp_path), "test", required=False) == []
    message = error_of(load_split, str(tmp_path), "test")
    assert "test.jsonl" in message and "train.jsonl, valid.jsonl" in message


def test_single_file_is_train_only(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "hi", "answer": 1}])
    assert load_split(str(path), "train") == [{"prompt": "hi", "answer": 1}]
    assert load_split(str(path), "valid", required=False) == []
    assert "train split only" in error_of(load_split, str(path), "valid")


def test_column_mapping_and_extra_columns(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q1", "solution": "s1", "difficulty": 3, "tests": ["a", "b"]}])
    [example] = load_split(str(tmp_path), "train", prompt_key="question", answer_key="solution")
    # The mapped columns keep their own names too: a reward function asking for `solution=` gets it.
    assert example == {
        "question": "q1",
        "solution": "s1",
        "prompt": "q1",
        "answer": "s1",
        "difficulty": 3,
        "tests": ["a", "b"],
    }


def test_answer_optional_for_whole_file_but_consistent(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}, {"prompt": "b", "x": 1}])
    assert load_split(str(tmp_path), "train") == [
        {"prompt": "a", "answer": None},
        {"prompt": "b", "x": 1, "answer": None},
    ]
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    message = error_of(load_split, str(tmp_path), "train")
    assert "train.jsonl:2:" in message and "missing key 'answer'" in message
    # An explicitly named answer column that no row has is a typo, not an optional column.
    message = error_of(load_split, str(tmp_path), "train", answer_key="solution")
    assert "train.jsonl:1:" in message and "'solution'" in message


def test_mapping_onto_existing_column_is_an_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "prompt": "p"}])
    message = error_of(load_split, str(tmp_path), "train", prompt_key="question")
    assert "train.jsonl:1:" in message and "'question'" in message and "'prompt'" in message


def test_chat_message_prompts(tmp_path):
    messages = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "2+2?"}]
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": messages, "answer": "4"}])
    assert load_split(str(tmp_path), "train")[0]["prompt"] == messages


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"nope": 1}\n\n', encoding="utf-8")
    message = error_of(load_split, str(tmp_path), "train")
    assert f"{path}:4: missing key 'prompt' (keys present: nope)" in message
    assert "--prompt-key/--answer-key" in message
    path.write_text('\ufeff{"prompt": "a"}\r\n\r\n{"prompt": "b"}', encoding="utf-8")
    assert [e["prompt"] for e in load_split(str(tmp_path), "train")] == ["a", "b"]


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "a",}', ":2: not valid JSON (Expecting property name"),
        ('["prompt", "a"]', ":2: expected a JSON object, got list"),
        ('{"prompt": ""}', ":2: key 'prompt' is an empty string"),
        ('{"prompt": 5}', ":2: key 'prompt' must be a non-empty string or a list"),
        ('{"prompt": []}', ":2: key 'prompt' must be a non-empty string or a list"),
        ('{"prompt": [{"role": "user"}]}', ":2: key 'prompt' message 0 must be an object with"),
        ('{"prompt": [{"role": "bot", "content": "x"}]}', ":2: key 'prompt' message 0 has role 'bot'"),
        ('{"prompt": [{"role": "user", "content": 3}]}', ":2: key 'prompt' message 0 content"),
    ],
)
def test_validation_errors_name_file_line_and_key(tmp_path, line, expected):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n", encoding="utf-8")
    message = error_of(load_split, str(tmp_path), "train")
    assert message.startswith(str(path)) and expected in message


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    message = error_of(load_split, str(tmp_path), "train")
    assert f"{path}:2: not valid UTF-8 (byte 0xe9" in message


def test_empty_file_is_an_error_when_required(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n\n", encoding="utf-8")
    assert f"{tmp_path / 'train.jsonl'}: no examples" in error_of(load_split, str(tmp_path), "train")
    assert load_split(str(tmp_path), "train", required=False) == []


def test_missing_path_that_is_no_hub_id(tmp_path):
    assert "no such file" in error_of(load_split, str(tmp_path / "nope" / "x.jsonl"), "train")
    assert "no such file" in error_of(load_split, "./nothing-here", "train")


def test_json_list_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"q": "b"}]), encoding="utf-8")
    assert f"{path}:row 2: missing key 'prompt'" in error_of(load_split, str(path), "train")
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]), encoding="utf-8")
    assert [e["prompt"] for e in load_split(str(path), "train")] == ["a", "b"]


# ---------------------------------------------------------------- the Hub (no network)


def test_pick_split_files_layouts():
    assert pick_split_files(["README.md", "train.jsonl", "test.jsonl"], "train") == ["train.jsonl"]
    shards = ["data/train-00001-of-00002.jsonl", "data/train-00000-of-00002.jsonl", "data/test-00000-of-00001.jsonl"]
    assert pick_split_files(shards, "train") == sorted(shards[:2])
    assert pick_split_files(["train.json", "data/train-0.parquet"], "train") == ["train.json"]
    assert pick_split_files(["data/train-0.parquet", "data/test-0.parquet"], "test") == ["data/test-0.parquet"]
    assert pick_split_files(["main/train-0.parquet", "main/test-0.parquet"], "train") == ["main/train-0.parquet"]
    assert pick_split_files(["a/train-0.parquet", "default/train-0.parquet"], "train") == ["default/train-0.parquet"]
    assert "several configs" in error_of(pick_split_files, ["a/train-0.parquet", "b/train-0.parquet"], "train")
    assert pick_split_files(["train.jsonl"], "validation") == []


def test_module_imports_no_mlx():
    import subprocess

    code = (
        "import sys, grpo_mlx.data; "
        "bad = [m for m in ('mlx', 'mlx_lm', 'huggingface_hub') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- answers and token ids


@pytest.mark.parametrize(
    "answer, expected",
    [
        ({"value": 4}, "train.jsonl:2: key 'answer' is a dict"),
        ([], "train.jsonl:2: key 'answer' is an empty list"),
        ([4, {"x": 1}], "train.jsonl:2: key 'answer' lists dict"),
        ([["4"]], "train.jsonl:2: key 'answer' lists list"),
    ],
)
def test_answers_that_are_objects_are_refused_naming_file_and_line(answer, expected, tmp_path):
    rows = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": answer}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_split(str(tmp_path), "train")
    assert expected in str(e.value)


def test_a_list_of_answers_is_kept(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "2+2", "answer": ["4", 4, "four"]}) + "\n")
    assert load_split(str(tmp_path), "train")[0]["answer"] == ["4", 4, "four"]


def test_token_ids_outside_the_vocabulary_are_refused():
    from grpo_mlx.data import check_token_ids

    check_token_ids([{"prompt_ids": [0, 5, 99]}], 100)
    with pytest.raises(DataError, match="token id 100, outside the model's vocabulary of 100"):
        check_token_ids([{"prompt_ids": [0, 100]}], 100)

    class Tok:
        eos_token_ids = {150}

    with pytest.raises(DataError, match="end-of-sequence id 150"):
        check_token_ids([], 100, Tok())


# ---------------------------------------------------------------- parquet, configs, offline


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


GSM8K_ROW = {"question": "Natalia sold 48 clips, then half as many. How many?", "answer": "48 + 24 = 72\n#### 72"}


def test_a_directory_of_parquet_shards_loads_like_jsonl(tmp_path):
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", [{"question": "b", "answer": "2"}])
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", [{"question": "a", "answer": "1"}])
    write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", [{"question": "c", "answer": "3"}])
    train = load_split(str(tmp_path), "train", prompt_key="question")
    assert [e["prompt"] for e in train] == ["a", "b"]  # shards in order
    assert [e["prompt"] for e in load_split(str(tmp_path), "valid", prompt_key="question")] == ["c"]
    assert load_split(str(tmp_path), "test", required=False) == []


def test_one_parquet_file_is_the_train_split(tmp_path):
    path = write_parquet(tmp_path / "gsm8k.parquet", [GSM8K_ROW])
    [example] = load_split(str(path), "train", prompt_key="question")
    assert example["answer"] == GSM8K_ROW["answer"] and example["question"] == GSM8K_ROW["question"]
    assert "train split only" in error_of(load_split, str(path), "test")


def test_a_bad_parquet_file_is_named(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"PAR1 this is not parquet")
    message = error_of(load_split, str(tmp_path), "train")
    assert message.startswith(f"{tmp_path / 'train.parquet'}: not a readable parquet file")
    write_parquet(tmp_path / "train.parquet", [{"prompt": "a"}, {"question": "b"}])
    # A parquet column is the whole file's: the row without it holds a null there.
    assert f"{tmp_path / 'train.parquet'}:row 2: key 'prompt'" in error_of(load_split, str(tmp_path), "train")


def test_data_config_picks_one_config(tmp_path):
    for config in ("main", "socratic"):
        write_parquet(tmp_path / config / "train-00000-of-00001.parquet", [{**GSM8K_ROW, "question": config}])
        write_parquet(tmp_path / config / "test-00000-of-00001.parquet", [{**GSM8K_ROW, "question": config + "?"}])
    [main] = load_split(str(tmp_path), "train", prompt_key="question", config="main")
    assert main["prompt"] == "main"
    [test] = load_split(str(tmp_path), "test", prompt_key="question", config="socratic")
    assert test["prompt"] == "socratic?"
    message = error_of(load_split, str(tmp_path), "train", prompt_key="question")
    assert "several configs (main, socratic)" in message and "--data-config main" in message
    message = error_of(load_split, str(tmp_path), "train", config="nope")
    assert "no config 'nope'" in message and "main, socratic" in message
