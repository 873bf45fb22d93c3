"""The judge reward: group mode's requests, one retry then None (counted, with the metric and the
samples' columns), the cache (repeats in a batch and across calls, resume, a torn line), the
judge_* keys, the example's configs, and the `base` judge in a real training run."""

import json
import math

import pytest

from grpo_mlx import judge as J
from grpo_mlx.config import DEMO_MODEL, ConfigError, build_config
from grpo_mlx.events import read_jsonl
from grpo_mlx.judge_backends import LocalBackend, chat_url
from grpo_mlx.rewards import RewardContext, compute_rewards, resolve_reward
from grpo_mlx.trainer import Trainer

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


def test_a_run_whose_data_lacks_a_rubric_column_is_refused_before_training():
    from grpo_mlx.rewards import RewardSpecError, check_columns

    rubric = "For {audience}: {answer}"
    cfg = build_config({"reward_functions": ["judge"], "judge_model": "base", "judge_rubric": rubric})
    name, reward = resolve_reward("judge", config=cfg)
    assert reward.needs_columns == ("audience", "answer")
    with pytest.raises(RewardSpecError, match="reward 'judge' needs the 'audience' column"):
        check_columns([(name, reward)], [{"prompt": "p", "answer": "1"}], "the data")


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
