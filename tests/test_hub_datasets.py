"""Hub datasets without the network: huggingface_hub's listing and downloads faked with local
files, and the real client against an unreachable endpoint."""

import sys

from grpo_mlx.data import load_split
from grpo_mlx.hub_datasets import load_hub_dataset
from tests.test_data import error_of, write_jsonl


def fake_hub(monkeypatch, tmp_path, files: dict):
    """Make huggingface_hub list and 'download' local files instead of using the network."""
    import huggingface_hub

    downloads = []
    for name, rows in files.items():
        write_jsonl(tmp_path / "hub" / name, rows)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, repo_type=None: list(files))

    monkeypatch.setattr("grpo_mlx.hub_datasets.hub_unreachable", lambda repo_id: None)

    def download(repo_id, filename, repo_type=None, **kwargs):
        assert repo_type == "dataset"
        downloads.append(filename)
        return str(tmp_path / "hub" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return downloads


def test_hub_load_through_load_split(monkeypatch, tmp_path):
    downloads = fake_hub(
        monkeypatch,
        tmp_path,
        {
            "data/train-00000-of-00002.jsonl": [{"question": "a", "answer": "1"}],
            "data/train-00001-of-00002.jsonl": [{"question": "b", "answer": "2"}],
            "data/validation-00000-of-00001.jsonl": [{"question": "c", "answer": "3"}],
        },
    )
    monkeypatch.chdir(tmp_path)  # so "owner/name" is no local path
    train = load_split("owner/name", "train", prompt_key="question")
    assert [(e["prompt"], e["answer"]) for e in train] == [("a", "1"), ("b", "2")]
    [valid] = load_split("owner/name", "valid", prompt_key="question")  # the Hub calls it "validation"
    assert (valid["prompt"], valid["answer"]) == ("c", "3")
    assert downloads[-1] == "data/validation-00000-of-00001.jsonl"
    assert load_hub_dataset("owner/name", "test", required=False) == []
    assert "no files for the test split" in error_of(load_hub_dataset, "owner/name", "test")


def test_hub_parquet_without_pyarrow(monkeypatch, tmp_path):
    fake_hub(monkeypatch, tmp_path, {"data/train-0.parquet": []})
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert "pip install pyarrow" in error_of(load_hub_dataset, "owner/name", "train")


def test_hub_network_error_becomes_data_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr("grpo_mlx.hub_datasets.hub_unreachable", lambda repo_id: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    message = error_of(load_hub_dataset, "owner/name", "train")
    assert "'owner/name'" in message and "OSError: connection refused" in message
    assert "not in the local cache" in message and "\n" not in message


def test_hub_offline_uses_cached_snapshot(monkeypatch, tmp_path):
    import huggingface_hub

    write_jsonl(tmp_path / "snap" / "train.jsonl", [{"prompt": "cached"}])

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id, repo_type, local_files_only: str(tmp_path / "snap")
    )
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda repo_id, filename, repo_type, local_files_only: str(tmp_path / "snap" / filename),
    )
    assert load_hub_dataset("owner/name", "train") == [{"prompt": "cached", "answer": None}]


def test_data_config_on_the_hub(monkeypatch, tmp_path):
    downloads = fake_hub(
        monkeypatch,
        tmp_path,
        {
            "main/train-00000-of-00001.jsonl": [{"question": "m", "answer": "1"}],
            "socratic/train-00000-of-00001.jsonl": [{"question": "s", "answer": "2"}],
        },
    )
    monkeypatch.chdir(tmp_path)
    [row] = load_split("openai/gsm8k", "train", prompt_key="question", config="socratic")
    assert row["prompt"] == "s" and downloads == ["socratic/train-00000-of-00001.jsonl"]


def test_offline_a_hub_id_fails_at_once_in_one_sentence(tmp_path):
    """huggingface_hub retries a refused connection five times with backoff (about 25 s) per
    request; the one probe without retries answers in well under that."""
    import os
    import subprocess
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}
    code = "from grpo_mlx.data import load_split; load_split('owner/name', 'train')"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    elapsed = time.monotonic() - start
    last = done.stderr.strip().splitlines()[-1]
    assert "DataError: Hub dataset 'owner/name': the Hub is unreachable (cannot reach http://127.0.0.1:9" in last
    assert "not in the local cache" in last and "Retrying" not in done.stderr
    assert elapsed < 15, f"took {elapsed:.1f} s"
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert "the Hub is unreachable (HF_HUB_OFFLINE is set)" in done.stderr
