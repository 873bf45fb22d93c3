"""`grpo-mlx eval`: the estimators against hand-computed numbers, answer voting, and the command
on the demo model with real (briefly trained) adapters."""

import argparse
import json
import math

import numpy as np
import pytest

from grpo_mlx import cli
from grpo_mlx.evaluate import majority_answer, parse_ks, pass_at_k, score_samples

# ------------------------------------------------------------------ pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
        (3, 1, 1, 1 / 3),  # pass@1 is c/n
        (16, 0, 16, 0.0),  # nothing right
        (16, 16, 1, 1.0),
        (4, 1, 4, 1.0),  # k = n: any right sample counts
        (5, 2, 4, 1.0),  # n - c < k: every 4-subset holds a right one
        (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_and_stays_stable():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # where C(n, k) overflows a float, the product form still gives an answer in [0, 1]
    value = pass_at_k(2000, 3, 1000)
    assert 0 <= value <= 1 and value == pytest.approx(1 - (1000 * 999 * 998) / (2000 * 1999 * 1998))


def test_pass_at_k_refuses_impossible_arguments():
    for n, c, k in [(4, 1, 5), (4, 5, 1), (4, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ------------------------------------------------------------------ voting


def test_majority_vote():
    assert majority_answer(["3", "4", "3"]) == "3"
    assert majority_answer(["4", "3", "3", "4"]) == "4", "a tie goes to the answer that came first"
    assert majority_answer(["5", "3", "3", "5", "5"]) == "5"
    assert majority_answer([None, None, "5"]) == "5", "completions without an answer do not vote"
    assert majority_answer([None, None]) is None and majority_answer([]) is None
    # equal answers in different spellings vote together; the first spelling represents them
    assert majority_answer(["7", "1,000", "1000.0"]) == "1,000"
    assert majority_answer(["7", "1,000", "1000.0", "7"]) == "7", "a tie: 7 came first"


def test_score_samples_by_hand():
    texts = [
        ["46", "the answer is 46", "45", "no idea"],  # prompt 0: 2 right, answers 46,46,45,None
        ["12", "13", "13", "#### 12"],
    ]  # prompt 1: 2 right, vote 13 (2) vs 12 (2) -> 12 first
    lengths = [[3, 8, 3, 2], [3, 3, 3, 5]]
    m = score_samples(texts, lengths, ["46", "12"], [1, 2, 4])
    assert m["pass@1"] == pytest.approx(0.5)
    assert m["pass@2"] == pytest.approx(1 - 1 / 6)  # each prompt: 1 - C(2,2)/C(4,2)
    assert m["pass@4"] == 1.0
    # maj@2: prompt 0 votes 46,46 -> right; prompt 1 votes 12,13 (tie) -> 12 -> right
    assert m["maj@2"] == 1.0
    # maj@4: prompt 0 -> 46 right; prompt 1: 12 x2, 13 x2 -> 12 (first) -> right
    assert m["maj@4"] == 1.0
    assert m["mean_length"] == pytest.approx(np.mean(lengths))
    assert m["answered"] == pytest.approx(7 / 8)
    assert m["format"] == 0.0
    assert "maj@1" not in m

    wrong_first = score_samples([["13", "12", "13", "12"]], [[1] * 4], ["12"], [2, 4])
    assert wrong_first["maj@4"] == 0.0 and wrong_first["maj@2"] == 0.0  # ties go to the earlier 13
    none_only = score_samples([["?", "?"]], [[1, 1]], ["3"], [2])
    assert none_only["maj@2"] == 0.0 and none_only["pass@2"] == 0.0


def test_format_compliance():
    good = "<think>4 + 2</think><answer>6</answer>"
    m = score_samples([[good, "6"]], [[10, 1]], ["6"], [1, 2])
    assert m["format"] == 0.5 and m["pass@1"] == 1.0


def test_parse_ks():
    assert parse_ks("16,1,4,4") == [1, 4, 16]
    for bad in ["0", "a,b", ""]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_ks(bad)


# ------------------------------------------------------------------ on the demo model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.test_fuse import train_adapters

    return train_adapters(tmp_path_factory.mktemp("eval"), eval_limit=24).run_dir


def _eval_json(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    assert cli.main(["eval", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_greedy_eval_is_reproducible_and_matches_the_trainer(run_dir, tmp_path, capsys):
    args = ["--adapter-path", str(run_dir), "--temperature", "0", "--limit", "24"]
    first = _eval_json(tmp_path, "a", *args)
    second = _eval_json(tmp_path, "b", *args)
    assert first == second, "greedy evaluation is deterministic"
    assert first["k"] == [1] and first["samples_per_prompt"] == 1 and first["prompts"] == 24
    base, adapted = first["results"]["base"], first["results"]["adapters"]
    assert set(base) == {"pass@1", "format", "mean_length", "answered"}
    table = capsys.readouterr().out
    assert "pass@1" in table and "base" in table and "adapters" in table and "change" in table

    # the trainer scored the same 24 held-out prompts greedily before and after training:
    # the base column is the model before training (adapters off = adapters at zero)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_examples"] == 24
    assert base["pass@1"] == pytest.approx(summary["accuracy_before"])
    assert adapted["pass@1"] == pytest.approx(summary["accuracy_after"])
    assert adapted != base


def test_sampled_eval_reports_pass_and_majority_at_k(run_dir, tmp_path):
    report = _eval_json(tmp_path, "s", "--adapter-path", str(run_dir), "-k", "1,4", "--limit", "16", "--seed", "3")
    assert report["temperature"] == 0.7 and report["samples_per_prompt"] == 4 and report["seed"] == 3
    for column in ("base", "adapters"):
        m = report["results"][column]
        assert set(m) == {"pass@1", "pass@4", "maj@4", "format", "mean_length", "answered"}
        assert 0 <= m["pass@1"] <= m["pass@4"] <= 1, "pass@k grows with k"
        assert 0 < m["mean_length"] <= 8
    again = _eval_json(tmp_path, "s2", "--adapter-path", str(run_dir), "-k", "1,4", "--limit", "16", "--seed", "3")
    assert again == report, "the same seed gives the same samples"


def test_eval_without_adapters_and_bad_input(tmp_path, capsys):
    report = _eval_json(tmp_path, "m", "--temperature", "0", "--limit", "8")
    assert list(report["results"]) == ["model"] and report["model"].endswith("demo/model")
    assert cli.main(["eval", "--adapter-path", str(tmp_path / "nope")]) == 1
    assert "adapter_config.json" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tmp_path / "nope"), "--data", str(tmp_path)]) == 1


def test_eval_every_emits_periodic_evaluations(tmp_path):
    from grpo_mlx.config import ConfigError, build_config
    from grpo_mlx.events import read_jsonl
    from grpo_mlx.trainer import Trainer

    with pytest.raises(ConfigError, match="eval_every"):
        build_config({"eval_every": -1})
    trainer = Trainer(
        build_config(
            dict(
                adapter_path=str(tmp_path / "run"),
                batch_size=2,
                group_size=2,
                iters=4,
                eval_every=2,
                eval_limit=4,
                save_every=100,
            )
        )
    )
    trainer.run()
    evals = [(e["step"], e["name"]) for e in read_jsonl(str(trainer.run_dir / "metrics.jsonl")) if e["type"] == "eval"]
    assert evals == [(0, "before"), (2, "periodic"), (4, "periodic"), (4, "after")]


# ------------------------------------------------------------------ values checked before the work


def eval_args(*extra):
    return cli.make_parser().parse_args(["eval", *extra])


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--limit", "0"], "--limit 0"),
        (["--limit", "-3"], "--limit -3"),
        (["--temperature", "nan"], "--temperature nan"),
        (["--top-p", "nan"], "--top-p nan"),
        (["--seed", "-1"], "--seed -1"),
    ],
)
def test_bad_eval_values_are_refused(extra, expected):
    from grpo_mlx.config import ConfigError
    from grpo_mlx.evaluate import resolve_settings

    with pytest.raises(ConfigError, match=expected.replace("-", r"\-")):
        resolve_settings(eval_args(*extra))


def test_unwritable_json_path_is_refused_before_the_evaluation(tmp_path, capsys):
    code = cli.main(["eval", "--json", str(tmp_path / "no" / "such" / "dir" / "out.json"), "-k", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "--json" in err and "cannot write there" in err and "prompts" not in err
    assert not (tmp_path / "no").exists()


def test_k_far_beyond_memory_is_refused_and_batches_shrink_to_fit():
    from grpo_mlx.config import ConfigError
    from grpo_mlx.evaluate import plan_batch

    with pytest.raises(ConfigError, match="-k 1000000"):
        plan_batch(1_000_000, 16, per_sample=10**6, available=10**11, k_text="1000000")
    assert plan_batch(1000, 16, per_sample=10**6, available=10**10, k_text="1000") == 5  # 5 GB budget / 1 GB a prompt
    assert plan_batch(4, 16, per_sample=10**3, available=10**10, k_text="4") == 16


def test_eval_json_has_samples_custom_rewards_and_top_k(tmp_path, capsys):
    example = "examples/reward_example.py:concise_correct"
    args = ["--temperature", "0", "--limit", "6", "--batch-size", "4", "--reward-functions", "accuracy", example]
    report = _eval_json(tmp_path, "r", *args)
    metrics, rows = report["results"]["model"], report["samples"]["model"]
    assert metrics["rewards/accuracy/mean"] == pytest.approx(metrics["pass@1"]), "the same loader and answers"
    assert "rewards/concise_correct/mean" in metrics
    assert len(rows) == 6 and {"prompt", "completion", "extracted_answer", "correct", "rewards"} <= set(rows[0])
    assert sum(r["correct"] for r in rows) / 6 == pytest.approx(metrics["pass@1"])
    err = capsys.readouterr().err
    assert "model: 4/6 prompts sampled" in err and "model: 6/6 prompts sampled" in err
    # top-k 1 at temperature 1 is greedy: the same completions as above
    top1 = _eval_json(tmp_path, "k", "--temperature", "1", "-k", "1", "--top-k", "1", "--min-p", "0.1", "--limit", "6")
    assert top1["top_k"] == 1 and top1["min_p"] == 0.1
    assert [r["completion"] for r in top1["samples"]["model"]] == [r["completion"] for r in rows]
    assert cli.main(["eval", "--reward-functions", "acuracy", "--limit", "2"]) == 1
    assert "did you mean 'accuracy'" in capsys.readouterr().err


def test_eval_renders_prompts_as_the_run_did(tmp_path):
    """chat_template_kwargs, ignore_chat_template and data_config default to the run's."""
    from grpo_mlx.config import ConfigError
    from grpo_mlx.evaluate import resolve_settings

    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"model": "some/model"}))
    saved = {"max_completion_length": 64, "data": "openai/gsm8k", "data_config": "main",
             "chat_template_kwargs": {"enable_thinking": False}, "ignore_chat_template": False}  # fmt: skip
    (run / "config.json").write_text(json.dumps(saved))
    settings = resolve_settings(eval_args("--adapter-path", str(run)))
    assert settings["chat_template_kwargs"] == {"enable_thinking": False} and settings["data_config"] == "main"
    settings = resolve_settings(
        eval_args("--adapter-path", str(run), "--chat-template-kwargs", "{}", "--ignore-chat-template")
    )
    assert settings["chat_template_kwargs"] == {} and settings["ignore_chat_template"] is True
    with pytest.raises(ConfigError, match="'chat_template_kwargs': not valid JSON"):
        resolve_settings(eval_args("--chat-template-kwargs", "{x}"))


# ------------------------------------------------------------------ episodes (tools), on a tiny model

from tests.test_episodes import CALL, eos, ids, script, tool_setup  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tool_setup(tmp_path_factory.mktemp("tok"))


COUNTER = '''
class Counter:
    """Counts its calls; the reward is whether it was called."""

    def reset(self, **row):
        self.count = 0

    def bump(self) -> str:
        """Count one."""
        self.count += 1
        return str(self.count)

    def get_reward(self):
        return float(self.count > 0)
'''


def eval_agent(tok, **saved):
    from grpo_mlx.evaluate import episode_settings, run_agent

    settings = {**episode_settings(saved), "system_prompt": None, "chat_template_kwargs": None,
                "ignore_chat_template": False}  # fmt: skip
    return run_agent(settings, tok)


def scripted(monkeypatch, rows):
    from grpo_mlx import episodes

    real = episodes.generate_episodes
    monkeypatch.setattr(episodes, "generate_episodes", lambda *a, **k: real(*a, **k, force=script(rows)))


def test_eval_samples_the_runs_episodes_and_reads_answers_from_the_last_turn(setup, monkeypatch):
    """A run saved with tools: eval builds its agent, samples episodes, and pass@k counts the
    answer of the last assistant turn only (a tool result that holds the answer does not count)."""
    from grpo_mlx import prompts
    from grpo_mlx.evaluate import evaluate

    tok, model = setup[0], setup[1]
    assert eval_agent(tok) is None  # a run without tools: the plain sampler
    agent = eval_agent(tok, tools=["calculator"], max_turns=2)
    assert agent.max_turns == 2 and [s["function"]["name"] for s in agent.schemas] == ["calculator"]
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 1 + 4?", "answer": "5"}]
    examples = prompts.prepare_examples(rows, tok, tools=agent.schemas)
    E = eos(tok)
    scripted(monkeypatch, [
        [ids(tok, CALL), ids(tok, " The answer is 5.") + [E]],  # right, after a call
        [ids(tok, " The answer is 4.") + [E]],  # wrong
        [ids(tok, CALL), ids(tok, " I cannot tell.") + [E]],  # wrong: only the tool's result says 5
        [ids(tok, CALL)] * 4,  # cut at max_turns while calling: no answer
    ])  # fmt: skip
    samples = []
    metrics = evaluate(model, tok, examples, ks=[1, 2], temperature=0.7, max_tokens=200, samples=samples, agent=agent)
    assert metrics["pass@1"] == 0.25 and metrics["pass@2"] == 0.5
    assert [s["correct"] for s in samples] == [True, False, False, False]
    assert [t["role"] for t in samples[0]["turns"]] == ["tool_call", "tool", "assistant"]
    assert "5" in samples[2]["completion"] and samples[2]["extracted_answer"] != "5"


def test_eval_gives_the_environment_reward_its_environments(setup, tmp_path, monkeypatch):
    from grpo_mlx import prompts, rewards
    from grpo_mlx.evaluate import evaluate

    tok, model = setup[0], setup[1]
    (tmp_path / "counter_env.py").write_text(COUNTER)
    agent = eval_agent(tok, environment=f"{tmp_path / 'counter_env.py'}:Counter")
    examples = prompts.prepare_examples([{"prompt": "Count.", "answer": "1"}], tok, tools=agent.schemas)
    bump = '<tool_call>\n{"name": "bump", "arguments": {}}\n</tool_call>'
    done = ids(tok, " 1") + [eos(tok)]
    scripted(monkeypatch, [[ids(tok, bump), done], [done], [done], [ids(tok, bump), done]])
    metrics = evaluate(model, tok, examples, ks=[4], temperature=1.0, max_tokens=120, agent=agent,
                       reward_fns=[rewards.resolve_reward("environment")])  # fmt: skip
    assert metrics["rewards/environment/mean"] == 0.5 and not agent.live  # released once scored


def test_the_trainers_held_out_evaluation_runs_greedy_episodes(setup, tmp_path, monkeypatch):
    import mlx.core as mx

    from grpo_mlx import prompts
    from grpo_mlx.config import build_config
    from grpo_mlx.policy import add_adapters
    from grpo_mlx.testing import build_random_model
    from grpo_mlx.trainer import Trainer

    tok = setup[0]
    mx.random.seed(3)
    model, _ = build_random_model(f"tiny:vocab_size={len(tok.vocab)}")
    cfg = build_config({"batch_size": 2, "group_size": 2, "eval_limit": 0, "max_completion_length": 120,
                        "tools": ["calculator"], "reward_functions": ["length"],
                        "adapter_path": str(tmp_path / "run")})  # fmt: skip
    t = Trainer.from_parts(cfg, model, tok, [], adapter_config=add_adapters(model, cfg))
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 1 + 4?", "answer": "5"}]
    held = prompts.prepare_examples(rows, tok, tools=t.agent.schemas)
    E = eos(tok)
    scripted(monkeypatch, [[ids(tok, CALL), ids(tok, " The answer is 5.") + [E]], [ids(tok, " It is 4.") + [E]]])
    out = t.evaluate(held)
    assert out["n"] == 2 and out["accuracy"] == 0.5 and math.isfinite(out["mean_reward"])
    assert out["tool_use"] == 0.5  # the first episode called the calculator, the second did not


def test_grpo_mlx_eval_of_a_run_with_tools_samples_its_episodes(tmp_path, monkeypatch):
    """The command end to end: a one-step run with tools, then `grpo-mlx eval --adapter-path`
    reads the run's tools from its config.json, shows them in the prompts and runs episodes."""
    from grpo_mlx import episodes
    from grpo_mlx.config import build_config
    from grpo_mlx.trainer import Trainer
    from tests.test_episodes import tool_model_dir

    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    tok = tool_model_dir(tmp_path / "model")
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 1 + 4?", "answer": "5"}]
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    answer = ids(tok, " The answer is 5.") + [eos(tok)]
    call = ids(tok, CALL)
    seen = []
    real = episodes.generate_episodes

    def forced(model, tokenizer, prompts, *a, **k):  # prompt 0 calls, then answers; prompt 1 answers at once
        seen.extend(tokenizer.decode(p) for p in prompts)
        return real(model, tokenizer, prompts, *a, **k, force=script([[call, answer], [answer]] * len(prompts)))

    monkeypatch.setattr(episodes, "generate_episodes", forced)
    run_dir = tmp_path / "run"
    model_dir, data_dir = str(tmp_path / "model"), str(tmp_path / "data")
    Trainer(build_config({"model": model_dir, "data": data_dir, "adapter_path": str(run_dir),
                          "iters": 1, "batch_size": 2, "group_size": 2, "eval_limit": 0, "max_completion_length": 80,
                          "tools": ["calculator"], "max_turns": 2, "reward_functions": ["length"]})).run()  # fmt: skip
    seen.clear()
    report = _eval_json(tmp_path, "tools", "--adapter-path", str(run_dir), "--split", "train", "--temperature", "0")
    assert report["tools"] == ["calculator"] and report["max_turns"] == 2
    assert seen and all("calculator" in p for p in seen)  # the prompts show the tool, as in training
    rows_base = report["samples"]["base"]
    assert [r["correct"] for r in rows_base] == [True, True]
    assert [t["role"] for t in rows_base[0]["turns"]] == ["tool_call", "tool", "assistant"]
    assert [t["role"] for t in rows_base[1]["turns"]] == ["assistant"]
    assert report["results"]["adapters"]["pass@1"] == 1.0
