"""The fused model served by the real `mlx_lm.server` answers an OpenAI-style chat request with
the same greedy answer as the trained policy in-process."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from grpo_mlx import cli, prompts
from grpo_mlx.policy import adapters_disabled
from grpo_mlx.sampler import generate_groups

PROMPTS = ["12+34", "55+66", "47+38", "19+99"]
MAX_TOKENS = 8
START_TIMEOUT = 90  # seconds for the server to import mlx-lm and load the model


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


def wait_until_up(proc, base: str, log_path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlx_lm.server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if http(base + "/health", timeout=2)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"mlx_lm.server did not answer within {START_TIMEOUT}s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.test_fuse import train_adapters

    return train_adapters(tmp_path_factory.mktemp("serve"))


def test_server_gives_the_policys_greedy_answers(trained, tmp_path):
    fused = tmp_path / "fused"
    assert cli.main(["fuse", "--adapter-path", str(trained.run_dir), "--save-path", str(fused)]) == 0

    # in-process: the policy (base + adapters), greedy, on the chat-template rendering "12+34="
    examples = prompts.prepare_examples([{"prompt": p} for p in PROMPTS], trained.tokenizer)
    assert examples[0]["prompt_text"] == "12+34="
    roll = generate_groups(
        trained.model, trained.tokenizer, [ex["prompt_ids"] for ex in examples], 1, MAX_TOKENS, temperature=0.0
    )
    expected = roll.texts
    assert all(reason == "stop" for reason in roll.finish_reasons)
    with adapters_disabled(trained.model):
        base = generate_groups(
            trained.model, trained.tokenizer, [ex["prompt_ids"] for ex in examples], 1, MAX_TOKENS, temperature=0.0
        ).texts
    assert base != expected, "pick prompts where the adapters change the answer"

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", str(fused), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
        try:
            wait_until_up(proc, base, log_path)
            answers = []
            for prompt in PROMPTS:
                status, reply = http(
                    base + "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": prompt}], "temperature": 0.0, "max_tokens": MAX_TOKENS},
                )
                assert status == 200, log_path.read_text()[-3000:]
                choice = reply["choices"][0]
                assert choice["finish_reason"] == "stop"
                answers.append(choice["message"]["content"])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    assert answers == expected, f"served {answers}, in-process {expected} (base model: {base})"
