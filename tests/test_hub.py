"""Hub uploads up to the HTTP boundary: the calls HfApi gets and the card it is given (a
recording stand-in for HfApi), a real HfApi against a loopback port nobody listens on (the
unreachable Hub), and a missing token."""

import json
import socket

import pytest

from grpo_mlx import cli, hub


class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = dict(model="mlx-community/Qwen2.5-0.5B-Instruct-4bit", reward_functions=["accuracy", "format"],
                  iters=2, batch_size=4, group_size=8, loss_type="grpo", beta=0.0, learning_rate=1e-5,
                  fine_tune_type="lora")  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    lines = [
        {"type": "eval", "step": 0, "name": "before", "metrics": {"n": 4, "accuracy": 0.25, "mean_reward": 0.3}},
        {"type": "step", "step": 1, "metrics": {"reward": 0.4}},
        {"type": "step", "step": 2, "metrics": {"reward": 0.875}},
        {"type": "eval", "step": 2, "name": "after", "metrics": {"n": 4, "accuracy": 0.75, "mean_reward": 0.8}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "adapters.safetensors").write_text("{}")
    (run / "adapter_config.json").write_text(json.dumps({"model": config["model"]}))
    return run


def test_run_figures_from_metrics_jsonl(run_dir):
    assert hub.run_figures(run_dir) == {
        "steps": 2, "final_reward": 0.875, "accuracy_before": 0.25, "mean_reward_before": 0.3,
        "accuracy_after": 0.75, "mean_reward_after": 0.8,
    }  # fmt: skip


def test_push_adapters_creates_the_repo_and_uploads_adapters_with_a_card(run_dir):
    api = RecordingApi()
    url = hub.push_adapters(run_dir, "me/qwen-gsm8k-grpo", api=api)
    assert url == "https://huggingface.co/me/qwen-gsm8k-grpo"
    (create, kw_create), (up, kw) = api.calls
    assert create == "create_repo" and kw_create["repo_id"] == "me/qwen-gsm8k-grpo" and kw_create["exist_ok"]
    assert up == "upload_folder" and kw["folder_path"] == str(run_dir) and kw["repo_id"] == "me/qwen-gsm8k-grpo"
    assert "adapters.safetensors" in kw["allow_patterns"] and "config.json" not in kw["allow_patterns"]
    card = (run_dir / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: mlx" in header and "pipeline_tag: text-generation" in header  # mlx-lm's conventions
    assert "base_model: mlx-community/Qwen2.5-0.5B-Instruct-4bit" in header and "- mlx" in header
    assert "`accuracy`, `format`" in card and "0.875" in card and "25.0% -> 75.0%" in card
    assert 'adapter_path=snapshot_download("me/qwen-gsm8k-grpo")' in card


def test_fused_card_names_the_base_and_the_run(run_dir, tmp_path):
    fused = tmp_path / "fused"
    fused.mkdir()
    api = RecordingApi()
    hub.push_fused(fused, "me/fused", "Qwen/Qwen2.5-0.5B-Instruct", run_dir / "checkpoints" / "step_2", api=api)
    card = (fused / "README.md").read_text()
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in card and 'load("me/fused")' in card and "75.0%" in card
    assert api.calls[1][1]["allow_patterns"] is None  # the whole model directory


def test_an_unreachable_hub_is_one_sentence_and_the_files_stay(run_dir, monkeypatch):
    pytest.importorskip("huggingface_hub")
    with socket.socket() as s:  # a loopback port that was free a moment ago: nothing answers there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from huggingface_hub import HfApi

    api = HfApi(endpoint=f"http://127.0.0.1:{port}", token="hf_test")
    with pytest.raises(hub.HubError, match=r"cannot upload .* to me/x: .*; the local files are kept"):
        hub.push_adapters(run_dir, "me/x", api=api)
    assert (run_dir / "adapters.safetensors").exists() and (run_dir / "README.md").exists()


def test_no_token_stops_fuse_before_any_work(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    code = cli.main(
        ["fuse", "--adapter-path", str(run_dir), "--save-path", str(tmp_path / "out"), "--upload-repo", "me/x"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "no Hugging Face token" in err and "nothing was fused" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_no_token_stops_train_push_to_hub_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    code = cli.main(["train", "--push-to-hub", "me/x", "--iters", "1", "--adapter-path", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "no Hugging Face token" in err and "nothing was trained" in err
    assert not (tmp_path / "run" / "adapters.safetensors").exists()
