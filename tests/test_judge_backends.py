"""Who answers the judge: the endpoint against a stub server on loopback (exact scores, bounded
concurrency, the key and model name, retries, refusals, the timeout), the real mlx_lm.server
(scores, then its death mid-run: one sentence and a checkpoint), and a local mlx-lm judge."""

import contextlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grpo_mlx import judge as J
from grpo_mlx.config import DEMO_MODEL
from grpo_mlx.events import read_jsonl
from grpo_mlx.judge_backends import EndpointBackend, LocalBackend
from grpo_mlx.rewards import resolve_reward
from grpo_mlx.trainer import Trainer, TrainingStopped
from tests.test_judge import RUBRIC, demo_config, settings
from tests.test_serve import free_port, wait_until_up

# ------------------------------------------------------------------ a stub server on loopback


@contextlib.contextmanager
def stub_server(reply):
    """A chat-completions server on loopback; `reply(body, headers) -> (status, content)`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, content = reply(body, dict(self.headers))
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_endpoint_scores_with_bounded_concurrency_and_the_key(monkeypatch):
    bound, lock, now, most, seen = 3, threading.Lock(), [0], [0], []
    barrier = threading.Barrier(bound, timeout=20)  # passes only when `bound` requests are in flight at once

    def reply(body, headers):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
            seen.append((body, headers.get("Authorization")))
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return 500, ""
        finally:
            with lock:
                now[0] -= 1
        completion = body["messages"][0]["content"].split("## Response\n")[1].split("\n")[0]
        return 200, f"Looks fine. Score: {len(completion)}"

    monkeypatch.setenv("JUDGE_TEST_KEY", "secret")
    with stub_server(reply) as url:
        s = settings(model=url + "#my-judge", concurrency=bound, api_key_env="JUDGE_TEST_KEY", retries=0)
        v = J.Judge(s, EndpointBackend(s)).judge(["p"] * 6, ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"], {})
    assert v.raw == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and v.scores[4] == 0.5
    assert v.reasons[0] == "Looks fine."
    assert most[0] == bound, f"{most[0]} requests at once, bound {bound}"
    body, auth = seen[0]
    assert auth == "Bearer secret" and body["model"] == "my-judge"
    assert body["temperature"] == 0.0 and body["max_tokens"] == 8 and "seed" in body


def test_endpoint_retries_then_fails_in_one_sentence():
    calls = []

    def flaky(body, headers):
        calls.append(1)
        return (503, "") if len(calls) <= 2 else (200, "Score: 5")

    with stub_server(flaky) as url:
        s = settings(model=url, retries=2)
        assert J.Judge(s, EndpointBackend(s, backoff=0.01)).judge(["p"], ["x"], {}).raw == [5.0]
    assert len(calls) == 3
    with stub_server(lambda body, headers: (503, "")) as url:
        s = settings(model=url, retries=1)
        with pytest.raises(J.JudgeError, match=r"gave no answer after 2 tries: HTTP 503"):
            EndpointBackend(s, backoff=0.01).complete([[{"role": "user", "content": "x"}]], {})
    with stub_server(lambda body, headers: (401, "")) as url:
        s = settings(model=url, retries=5)
        with pytest.raises(J.JudgeError, match=r"refused the request: HTTP 401.*OPENAI_API_KEY"):
            EndpointBackend(s, backoff=0.01).complete([[{"role": "user", "content": "x"}]], {})


def test_endpoint_timeout_is_reported():
    release = threading.Event()

    def slow(body, headers):
        release.wait(10)
        return 200, "Score: 1"

    with stub_server(slow) as url:
        s = settings(model=url, retries=0, timeout=0.2)
        try:
            with pytest.raises(J.JudgeError, match=r"no answer within judge_timeout = 0.2 s"):
                EndpointBackend(s).complete([[{"role": "user", "content": "x"}]], {})
        finally:
            release.set()


def test_local_judge_is_loaded_beside_the_policy(tmp_path):
    cfg = demo_config(tmp_path, judge_model=DEMO_MODEL, judge_concurrency=2)
    name, reward = resolve_reward("judge", config=cfg)
    J.bind_judges([(name, reward)], None, None, tmp_path)
    backend = reward.judge.backend
    assert isinstance(backend, LocalBackend) and not backend.base and backend.id == f"mlx:{DEMO_MODEL}"
    scores = reward(["12+34"] * 3, ["46", "50", "88"])
    assert len(scores) == 3 and all(s is None or 0 <= s <= 1 for s in scores)
    assert sum(s is not None for s in scores) >= 2, f"the demo model adds ten to most numbers: {scores}"


# ------------------------------------------------------------------ the real mlx_lm.server


@contextlib.contextmanager
def mlx_lm_server(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", DEMO_MODEL, "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
        )  # fmt: skip
        try:
            wait_until_up(proc, base, log_path)
            yield base, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def test_real_server_judges_then_dies_mid_run_with_a_checkpoint(tmp_path):
    with mlx_lm_server(tmp_path) as (base, proc):
        s = settings(model=base + "/v1", rubric=RUBRIC, scale=(0.0, 200.0), max_tokens=4, concurrency=2)
        v = J.Judge(s, EndpointBackend(s)).judge(["p"] * 3, ["23", "41", "60"], {})
        assert sum(r is not None for r in v.raw) >= 2, f"the served demo model adds ten: {v.raw}"

        cfg = demo_config(tmp_path, judge_model=base, iters=3, judge_retries=1, judge_timeout=10)
        trainer = Trainer(cfg)

        def kill_after_first_step(event):
            if event.get("type") == "step" and event.get("step") == 1:
                proc.kill()
                proc.wait(timeout=10)

        trainer.bus.subscribe(kill_after_first_step)
        with pytest.raises(TrainingStopped) as stopped:
            trainer.run()
    message = str(stopped.value)
    assert "reward function 'judge'" in message and f"judge server {base}/v1/chat/completions" in message
    assert "gave no answer after 2 tries" in message and "Checkpoint saved at step 1" in message
    assert "\n" not in message
    assert (trainer.run_dir / "checkpoints" / "latest").exists()
    lines = (trainer.run_dir / J.CACHE_FILE).read_text().splitlines()
    [first] = [e for e in read_jsonl(str(trainer.run_dir / "samples.jsonl")) if e.get("type") == "samples"]
    texts = {c["text"] for g in first["groups"] for c in g["completions"]}
    assert len(lines) == len(texts), "step 1's distinct requests (one per distinct completion) are cached"


# ------------------------------------------------------------------ a server that is not up


def test_a_judge_server_that_is_not_up_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import grpo_mlx.trainer as T

    port = free_port()  # nothing listens there
    loaded = []
    monkeypatch.setattr(T, "load_model", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(J.JudgeError) as e:
        Trainer(demo_config(tmp_path, judge_model=f"http://127.0.0.1:{port}/v1")).setup()
    assert f"judge_model http://127.0.0.1:{port}/v1: cannot connect to 127.0.0.1:{port}" in str(e.value)
    assert "\n" not in str(e.value) and not loaded


def test_a_judge_server_that_is_up_passes_the_probe_and_the_dry_run_asks_it(tmp_path, monkeypatch, capsys):
    from grpo_mlx import cli

    asked = []

    def reply(body, headers):
        asked.append(body)
        return 200, "Score: 150"

    with stub_server(reply) as url:
        EndpointBackend(settings(model=url)).probe()
        assert not asked  # the probe connects and sends nothing
        monkeypatch.chdir(tmp_path)
        code = cli.main(["train", "--dry-run", "--reward-functions", "judge", "--judge-model", url,
                         "--judge-rubric", RUBRIC, "--judge-scale", "0-200"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and asked and "judge 0.75" in out  # 150 on 0-200, from the server


def test_the_dry_run_says_a_local_judge_needs_the_model(tmp_path, monkeypatch, capsys):
    from grpo_mlx import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "--dry-run", "--reward-functions", "judge", "accuracy", "--judge-model", "base",
                     "--judge-rubric", RUBRIC, "--judge-scale", "0-200"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "judge needs the model" in out and "total (judge not counted)" in out
