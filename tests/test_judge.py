"""The judge reward: rubric rendering, reading scores (pointwise and group), one retry then None,
the cache (repeats and resume), the endpoint against a stub server (exact scores, bounded
concurrency, retries, timeout, the key) and the real mlx_lm.server (and its death mid-run:
one sentence and a checkpoint), the `base` and local judges in-process."""

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grpo_mlx import judge as J
from grpo_mlx.config import DEMO_MODEL, ConfigError, build_config
from grpo_mlx.events import read_jsonl
from grpo_mlx.judge_backends import EndpointBackend, LocalBackend, chat_url
from grpo_mlx.rewards import RewardContext, compute_rewards, resolve_reward
from grpo_mlx.trainer import Trainer, TrainingStopped
from tests.test_serve import free_port, wait_until_up

SCALE = (0.0, 10.0)


def settings(**kw):
    base = dict(model="base", rubric="Rate it.", rubric_source="test rubric", scale=SCALE, max_tokens=8)
    return J.JudgeSettings(**{**base, **kw})


class FakeBackend:
    """Canned answers in order; records what it was asked."""

    id = "fake"

    def __init__(self, answers):
        self.answers, self.asked = list(answers), []

    def complete(self, requests, params):
        self.asked.extend(requests)
        return [self.answers.pop(0) for _ in requests]


# ------------------------------------------------------------------ asking and reading


def test_rubric_is_filled_with_prompt_completion_and_columns():
    s = settings(rubric="Q: {prompt}\nA: {completion}\nKey: {answer} ({source})\nScale {scale}. {{literal}}")
    [message] = J.pointwise_messages(s, {"prompt": "2+2", "completion": "4", "answer": "4", "source": "book"})
    assert message["content"] == "Q: 2+2\nA: 4\nKey: 4 (book)\nScale 0-10. {literal}"
    # without {completion} in the rubric, the prompt and response are appended with the answer format
    [message] = J.pointwise_messages(settings(rubric="Be fair."), {"prompt": "2+2", "completion": "5"})
    assert message["content"].startswith("Be fair.") and "## Response\n5" in message["content"]
    assert "Score: N" in message["content"]


def test_a_missing_field_is_one_sentence_naming_it_and_the_rubric():
    with pytest.raises(J.JudgeError, match=r"rubric test rubric: no field \{reference\}"):
        J.render("{reference}", {"prompt": "p"}, "test rubric")
    with pytest.raises(J.JudgeError, match="not a plain field name"):
        J.render("{prompt.__class__}", {"prompt": "p"}, "test rubric")


def test_rubric_file_is_read_and_a_missing_one_refused(tmp_path):
    path = tmp_path / "rubric.md"
    path.write_text("Rate {completion}")
    assert J.load_rubric(str(path)) == ("Rate {completion}", str(path))
    assert J.load_rubric("Rate the tone.")[1] == "judge_rubric"
    with pytest.raises(J.JudgeError, match="rubric file not found"):
        J.load_rubric(str(tmp_path / "missing.md"))


@pytest.mark.parametrize(
    "answer, score",
    [
        ("Clear and right.\nScore: 8", 8.0),
        ("I give it 7/10.", 7.0),
        ("3 out of 10", 3.0),
        ("Score: 12\nScore: 4", 4.0),  # the last in range
        ("Between 2 and 9, say 6", 6.0),
        ("Score: 11", None),  # outside the scale
        ("no number here", None),
    ],
)
def test_pointwise_score_is_the_last_number_on_the_scale(answer, score):
    assert J.parse_score(answer, SCALE)[0] == score


def test_reason_is_the_answer_without_its_score():
    assert J.parse_score("Concise and polite. Score: 9/10", SCALE) == (9.0, "Concise and polite.")


def test_group_answer_needs_exactly_one_score_per_response():
    good = "1: 7 - on topic\nResponse 2: 3 - rambles\n#3 = 10"
    assert J.parse_group(good, SCALE, 3) == ([7.0, 3.0, 10.0], ["on topic", "rambles", ""], "")
    assert J.parse_group("1: 7\n2: 3", SCALE, 3)[2] == "no score for response 3"
    assert J.parse_group("1: 7\n2: 3\n3: 1\n4: 2", SCALE, 3)[2] == "a score for response 4 of 3"
    assert J.parse_group("1: 7\n1: 8\n2: 3", SCALE, 2)[2] == "response 1 was scored twice"
    assert "outside" in J.parse_group("1: 7\n2: 30", SCALE, 2)[2]


def test_group_mode_asks_once_per_prompt_and_normalises():
    backend = FakeBackend(["1: 10\n2: 0\n3: 5", "1: 2\n2: 4\n3: 6"])
    judge = J.Judge(settings(mode="group"), backend, group_size=3)
    v = judge.judge(["p"] * 3 + ["q"] * 3, ["a", "b", "c", "d", "e", "f"], {})
    assert len(backend.asked) == 2
    text = backend.asked[0][0]["content"]
    assert "### Response 1\na" in text and "### Response 3\nc" in text and "exactly 3 lines" in text
    assert "### Response 1\nd" in backend.asked[1][0]["content"]
    assert v.scores == [1.0, 0.0, 0.5, 0.2, 0.4, 0.6] and v.unparseable == 0


def test_unreadable_answer_is_retried_once_then_none_and_counted():
    # completion 1: unreadable, then readable on the retry; completion 2: unreadable twice
    backend = FakeBackend(["Score: 6", "hmm", "no idea", "fine, Score: 4", "still nothing"])
    reward = J.JudgeReward(settings())
    reward.judge = J.Judge(reward.settings, backend)
    context = RewardContext()
    result = compute_rewards([("judge", reward)], None, ["p"] * 3, ["x", "y", "z"], {}, context=context)
    assert result.per_function["judge"][:2].tolist() == [0.6, 0.4]
    assert math.isnan(result.per_function["judge"][2]), "an unreadable judgment is None, not 0"
    assert len(backend.asked) == 5, "one retry per unreadable answer, no more"
    assert "could not be read" in backend.asked[3][-1]["content"]  # the retry says what was wrong
    assert backend.asked[3][-2] == {"role": "assistant", "content": "hmm"}
    assert context.metrics()["judge/unparseable"] == pytest.approx(1 / 3)
    assert result.extra["judge_score"] == [6.0, 4.0, None]
    assert result.extra["judge_reason"][2] == "unreadable judgment"


def test_unreadable_group_is_none_for_the_whole_group():
    backend = FakeBackend(["1: 4", "1: 4\n2: 5\n3: 6"])  # a missing score, then an extra one
    v = J.Judge(settings(mode="group"), backend, group_size=2).judge(["p", "p"], ["a", "b"], {})
    assert v.scores == [None, None] and v.unparseable == 2 and len(backend.asked) == 2


# ------------------------------------------------------------------ the cache


def test_a_repeated_request_is_answered_from_the_cache_and_after_resume(tmp_path):
    path = tmp_path / J.CACHE_FILE
    backend = FakeBackend(["Score: 7"])
    judge = J.Judge(settings(), backend, J.JudgeCache(path))
    assert judge.judge(["p"], ["x"], {}).cache_hits == 0
    again = judge.judge(["p"], ["x"], {})
    assert again.scores == [0.7] and again.cache_hits == 1 and len(backend.asked) == 1
    twice = FakeBackend(["Score: 2"])
    assert J.Judge(settings(), twice).judge(["p", "p"], ["y", "y"], {}).scores == [0.2, 0.2]
    assert len(twice.asked) == 1, "the same request twice in one batch is sent once"
    # a resumed run binds its judge to the same run directory: nothing is asked again
    reward = J.JudgeReward(settings())
    J.bind_judges([("judge", reward)], None, None, tmp_path)
    reward.judge.backend = FakeBackend([])  # would fail if asked
    context = RewardContext()
    assert reward(["p"], ["x"], log_metric=context.log_metric) == [0.7]
    assert context.metrics()["judge/cache_hits"] == 1
    # another sampling setting is another request
    other = J.Judge(settings(temperature=0.5), FakeBackend(["Score: 1"]), J.JudgeCache(path))
    assert other.judge(["p"], ["x"], {}).cache_hits == 0


def test_a_torn_last_line_of_the_cache_is_skipped(tmp_path):
    path = tmp_path / J.CACHE_FILE
    path.write_text(json.dumps({"key": "k", "answer": "Score: 3"}) + "\n" + '{"key": "j", "ans')
    assert J.JudgeCache(path).answers == {"k": "Score: 3"}


# ------------------------------------------------------------------ the config


def test_judge_keys_are_validated_naming_the_key():
    with pytest.raises(ConfigError, match="'judge_model' = None: the judge reward needs a judge"):
        build_config({"reward_functions": ["judge"]})
    with pytest.raises(ConfigError, match="'judge_scale'"):
        build_config({"reward_functions": ["judge"], "judge_model": "base", "judge_scale": "10-0"})
    with pytest.raises(ConfigError, match="'judge_mode'"):
        build_config({"judge_mode": "pairwise"})
    cfg = build_config({"reward_functions": ["judge"], "judge_model": "http://127.0.0.1:1/v1#judge"})
    name, fn = resolve_reward("judge", config=cfg)
    assert name == "judge" and isinstance(fn, J.EndpointJudgeReward)
    assert chat_url("http://h:1/v1#judge") == ("http://h:1/v1/chat/completions", "judge")
    assert chat_url("http://h:1") == ("http://h:1/v1/chat/completions", None)


def test_the_examples_configs_load_and_their_rubric_fits_the_data(monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the example's paths are relative to the project, as its comment says
    cfg = build_config({}, config_file="examples/judge/judge.yaml")
    s = J.settings_from(cfg)
    assert s.is_endpoint and s.mode == "group" and s.rubric_source.endswith("rubric.md")
    row = json.loads((root / "examples/judge/data/train.jsonl").read_text().splitlines()[0])
    [message] = J.group_messages(s, {**row, "completion": ""}, ["one", "two"])
    assert row["audience"] in message["content"] and "### Response 2\ntwo" in message["content"]
    demo = J.settings_from(build_config({}, config_file="examples/judge/demo_base_judge.yaml"))
    assert demo.model == "base" and demo.rubric == RUBRIC and demo.scale == (0.0, 200.0)


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


# ------------------------------------------------------------------ in-process judges and the trainer

RUBRIC = "{completion}+10"  # the demo model adds: its "judgment" is the completion plus ten
DEMO_JUDGE = dict(reward_functions=["judge"], judge_rubric=RUBRIC, judge_scale="0-200", judge_max_tokens=4)


def demo_config(tmp_path, **overrides):
    flags = dict(adapter_path=str(tmp_path / "run"), batch_size=2, group_size=2, iters=2, eval_limit=0,
                 save_every=100, learning_rate=1e-3, max_completion_length=4, **DEMO_JUDGE)  # fmt: skip
    return build_config({**flags, **overrides})


def test_base_judge_in_the_trainer_reports_scores_metrics_and_cache(tmp_path):
    trainer = Trainer(demo_config(tmp_path, judge_model="base", learning_rate=0.05))
    summary = trainer.run()
    assert summary["status"] == "finished"
    rows = [e for e in read_jsonl(str(trainer.run_dir / "metrics.jsonl")) if e.get("type") == "step"]
    for key in ("judge/unparseable", "judge/cache_hits", "time/judge"):
        assert all(key in r["metrics"] for r in rows), key
    samples = [e for e in read_jsonl(str(trainer.run_dir / "samples.jsonl")) if e.get("type") == "samples"]
    completion = samples[0]["groups"][0]["completions"][0]
    assert set(completion["extra"]) == {"judge_score", "judge_reason"}
    assert (trainer.run_dir / J.CACHE_FILE).exists()
    # `base` is the policy with its adapters off: its answers are those of the model as loaded
    from grpo_mlx.policy import load_model, prepare_for_cpu

    fresh, tokenizer = load_model(DEMO_MODEL)
    prepare_for_cpu(fresh)
    request = [[{"role": "user", "content": "23+10"}], [{"role": "user", "content": "7+10"}]]
    params = {"max_tokens": 4, "temperature": 0.0, "seed": 0}
    s = trainer.reward_fns[0][1].settings
    via_base = trainer.reward_fns[0][1].judge.backend.complete(request, params)
    assert via_base == LocalBackend(fresh, tokenizer, "fresh", s).complete(request, params)
    policy = LocalBackend(trainer.model, trainer.tokenizer, "policy", s).complete(request, params)
    assert policy != via_base, "pick requests where the trained adapters change the answer"


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
