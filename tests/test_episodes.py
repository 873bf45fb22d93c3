"""Multi-turn episodes on a tiny model with a byte-level BPE tokenizer and a ChatML tool template
built here. A random model does not call tools by itself, so a scripted policy forces the
model's tokens where a test needs a call (the real sampler runs and picks every other token)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from grpo_mlx import episodes
from grpo_mlx.batch import make_batch, training_arrays
from grpo_mlx.episodes import Agent, ResultRenderer, TemplateError, generate_episodes
from grpo_mlx.logprobs import completion_logprobs
from grpo_mlx.tools import Toolbox, calculator

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call>'
BAD_CALL = '<tool_call>\n{"name": "nosuch", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tool_setup(tmp_path_factory.mktemp("tok"))


def tool_setup(path):
    """(tokenizer, tiny model, calculator toolbox, renderer, prompt ids); other test files use it."""
    from grpo_mlx.testing import build_random_model, build_tool_tokenizer

    tok = build_tool_tokenizer(path)
    mx.random.seed(0)
    model, _ = build_random_model(f"tiny:vocab_size={len(tok.vocab)}")
    box = Toolbox({"calculator": calculator}, timeout=5.0)
    renderer = ResultRenderer(tok, box.schemas)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tools=box.schemas, add_generation_prompt=True, tokenize=False
    )
    prompt = tok.encode(text, add_special_tokens=False)
    return tok, model, box, renderer, prompt


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def script(turns_of_rows):
    """force(): row r's model tokens, turn by turn, placed after whatever the episode appended
    (a turn starts where the row's sequence stands when its previous turn's script ran out)."""
    state = {}

    def force(rows, pos):
        out = np.full(len(rows), -1)
        for b, (r, p) in enumerate(zip(rows, pos)):
            turns = turns_of_rows[int(r)]
            turn, start = state.get(int(r), (0, 0))
            if turn < len(turns) and p - start >= len(turns[turn]):  # this turn's script is done
                turn, start = turn + 1, p
                state[int(r)] = (turn, start)
            if turn < len(turns) and p - start < len(turns[turn]):
                out[b] = turns[turn][p - start]
        return out

    return force


def eos(tok):
    return sorted(tok.eos_token_ids)[0]


def run(setup, turns_of_rows, group_size=None, max_tokens=160, max_turns=3, temperature=1.0):
    tok, model, box, renderer, prompt = setup
    G = group_size or len(turns_of_rows)
    n_prompts = len(turns_of_rows) // G
    return generate_episodes(model, tok, [prompt] * n_prompts, G, max_tokens, box, renderer, max_turns=max_turns,
                             temperature=temperature, seeds=list(range(n_prompts)),
                             force=script(turns_of_rows))  # fmt: skip


def test_a_call_is_run_and_its_result_appended_and_masked(setup):
    tok, model, box, renderer, prompt = setup
    E = eos(tok)
    answer = ids(tok, " The answer is 5.") + [E]
    rows = [[ids(tok, CALL), answer], [answer], [ids(tok, BAD_CALL), answer], [ids(tok, CALL), answer]]
    roll, stats = run(setup, rows)
    suffix = ids(tok, renderer.suffix([("calculator", "5")], ended_with=ids(tok, CALL)[-1]))
    expected = ids(tok, CALL) + suffix + answer
    assert roll.tokens[0, : roll.lengths[0]].tolist() == expected
    assert roll.env_mask[0, : len(expected)].tolist() == [False] * len(ids(tok, CALL)) + [True] * len(suffix) + [
        False
    ] * len(answer)
    assert "<tool_response>" not in tok.decode(answer) and "5" in tok.decode(suffix)
    assert (roll.logprobs[roll.env_mask] == 0).all() and (roll.logprobs[roll.mask] < 0).all()
    assert roll.tokens[1, : roll.lengths[1]].tolist() == answer and not roll.env_mask[1].any()
    assert stats.calls.tolist() == [1, 0, 1, 1] and stats.errors.tolist() == [0, 0, 1, 0]
    assert stats.turns.tolist() == [2, 1, 2, 2] and roll.finish_reasons == ["stop"] * 4
    assert "no tool named 'nosuch'" in tok.decode(roll.tokens[2, : roll.lengths[2]].tolist())
    tool = {"role": "tool", "text": "5", "name": "calculator", "arguments": None, "error": False}
    call = {"role": "tool_call", "text": "", "name": "calculator", "arguments": {"expression": "2 + 3"}, "error": False}
    assert roll.turns[0] == [call, tool, {**tool, "role": "assistant", "text": "The answer is 5.", "name": None}]
    assert roll.turns[1] == [{**tool, "role": "assistant", "text": "The answer is 5.", "name": None}]
    roles = [(t["role"], t["error"]) for t in roll.turns[2]]
    assert roles == [("tool_call", False), ("tool", True), ("assistant", False)]
    assert "no tool named" in roll.turns[2][1]["text"] and stats.log is roll.turns
    assert roll.select(slice(2, 4), len(prompt)).turns == roll.turns[2:]


def test_turns_keep_the_text_beside_a_call_and_name_a_call_that_does_not_parse(setup):
    tok = setup[0]
    broken = '<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>'
    turns = [ids(tok, "Let me add." + CALL), ids(tok, broken), ids(tok, " 5") + [eos(tok)]]
    roll, stats = run(setup, [turns], max_tokens=400)
    roles = [(t["role"], t["error"]) for t in roll.turns[0]]
    assert roles == [("assistant", False), ("tool_call", False), ("tool", False), ("tool_call", True), ("tool", True),
                     ("assistant", False)]  # fmt: skip
    assert roll.turns[0][0]["text"] == "Let me add." and roll.turns[0][3]["text"]  # why it did not parse
    assert stats.errors[0] == 1


def test_concat_carries_turns_beside_single_turn_rows(setup):
    from grpo_mlx.sampler import Rollout

    tok, *_, prompt = setup
    roll, _ = run(setup, [[ids(tok, CALL), ids(tok, " 5") + [eos(tok)]], [ids(tok, " 5") + [eos(tok)]]])
    plain = roll.select(slice(0, 2), len(prompt))
    plain.turns = None
    assert Rollout.concat([plain, plain]).turns is None  # single-turn rollouts stay without turns
    both = Rollout.concat([roll, plain])
    assert both.turns[:2] == roll.turns and both.turns[2:] == [None, None]


def test_only_the_appended_tokens_are_prefilled(setup, monkeypatch):
    """The boundary's forward sees exactly the appended tokens of the rows that go on (not their
    history): the rest of each row's cache is kept."""
    from grpo_mlx import logprobs

    tok = setup[0]
    real = logprobs.lm_head_split
    shapes = []

    def counting(model):
        body, head = real(model)

        def body_counted(x, cache=None):
            shapes.append(tuple(x.shape))
            return body(x, cache=cache)

        return body_counted, head

    monkeypatch.setattr(logprobs, "lm_head_split", counting)
    answer = ids(tok, " 5") + [eos(tok)]
    roll, stats = run(setup, [[ids(tok, CALL), answer], [answer], [ids(tok, CALL), ids(tok, CALL), answer]])
    appended = [int(roll.env_mask[r].sum()) for r in range(3)]
    prompt_prefill, *boundaries = shapes
    assert prompt_prefill == (1, len(setup[4]) - 1)  # the prompt once for its group
    # boundary 1: rows 0 and 2 go on, each appends its result; boundary 2: row 2 alone
    assert boundaries[0] == (2, appended[0]) and boundaries[1] == (1, appended[2] - appended[0])
    assert stats.prefill_tokens == appended[0] + appended[2] == int(roll.env_mask.sum())
    assert stats.boundaries == 2


def test_sampled_logprobs_match_a_teacher_forced_pass_over_the_episode(setup):
    """Forced call, then the model samples freely until the budget: every model token's recorded
    log-prob equals the training pass over [prompt | whole episode] (the cache was kept right)."""
    tok, model, *_, prompt = setup
    rows = [[ids(tok, CALL)], [ids(tok, CALL), ids(tok, CALL)], [[]], [ids(tok, " x")]]
    roll, stats = run(setup, rows, max_tokens=120, temperature=0.7)
    assert stats.calls[0] == 1 and stats.calls[1] >= 1
    tokens, lens, mask = training_arrays([prompt], roll, 4, 0)
    logp = completion_logprobs(model, tokens, lens, mask.shape[1], 0.7)  # (N, T)
    t = roll.tokens.shape[1]
    m = np.array(mask)[:, :t] > 0
    assert m.sum() > 100 and not (m & roll.env_mask).any()
    np.testing.assert_allclose(np.array(logp)[:, :t][m], roll.logprobs[m], atol=1e-4)


def test_max_turns_cuts_an_episode_that_keeps_calling(setup):
    tok = setup[0]
    roll, stats = run(setup, [[ids(tok, CALL)] * 5], max_turns=2)
    assert stats.calls[0] == 2 and stats.turns[0] == 3 and stats.cut_at_turns[0]
    assert roll.finish_reasons == ["stop"]


def test_the_budget_cuts_a_result_that_does_not_fit(setup):
    tok = setup[0]
    n_call = len(ids(tok, CALL))
    roll, stats = run(setup, [[ids(tok, CALL)]], max_tokens=n_call + 3)
    assert roll.lengths[0] == n_call + 3 and roll.finish_reasons == ["length"]
    assert roll.env_mask[0, n_call:].all() and not roll.env_mask[0, :n_call].any()


def test_gradient_at_tool_result_positions_is_exactly_zero(setup):
    """The loss (with a KL term) through the teacher-forced pass: the gradient with respect to
    the log-probs at appended positions is 0, and it is not 0 at the model's own."""
    from grpo_mlx.loss import policy_loss

    tok, model, *_, prompt = setup
    roll, _ = run(setup, [[ids(tok, CALL), ids(tok, " 5") + [eos(tok)]], [ids(tok, " 5") + [eos(tok)]]])
    tokens, lens, mask = training_arrays([prompt], roll, 2, 0)
    logp = mx.stop_gradient(completion_logprobs(model, tokens, lens, mask.shape[1], 1.0))  # (N, T)
    adv = mx.array([1.0, -1.0])

    def loss(lp, loss_type):
        return policy_loss(lp, mx.stop_gradient(lp), logp - 0.1, adv, mask, beta=0.1, loss_type=loss_type)[0]

    t = roll.tokens.shape[1]
    assert roll.env_mask.sum() > 10
    for loss_type in ("grpo", "dapo"):
        g = np.array(mx.grad(loss)(logp, loss_type))[:, :t]  # (N, t)
        assert (g[roll.env_mask] == 0).all()
        assert (np.abs(g[roll.mask]) > 0).all()


def test_a_template_that_rewrites_earlier_turns_is_refused(setup):
    tok = setup[0]

    class Rewriting:
        eos_token_ids = tok.eos_token_ids

        def decode(self, i):
            return tok.decode(i)

        def apply_chat_template(self, messages, add_generation_prompt, tokenize, tools=None):
            head = "T:" if messages[2:] else ""  # a later message changes the text before the first
            return head + "".join(m["content"] for m in messages) + ("A:" if add_generation_prompt else "")

    with pytest.raises(TemplateError, match="prefix"):
        ResultRenderer(Rewriting(), []).suffix([("calculator", "5")])


def test_the_trainer_takes_a_step_on_episodes(setup, tmp_path, monkeypatch):
    """Tools in the config: the trainer samples episodes (scripted calls), scores the whole
    episode text, trains on the model's tokens, and logs the tool metrics."""
    from grpo_mlx import metric_names as M
    from grpo_mlx.config import build_config
    from grpo_mlx.policy import add_adapters
    from grpo_mlx.testing import build_random_model
    from grpo_mlx.trainer import Trainer

    tok = setup[0]
    mx.random.seed(1)
    model, _ = build_random_model(f"tiny:vocab_size={len(tok.vocab)}")
    answer = ids(tok, " 5") + [eos(tok)]
    cfg = build_config({"batch_size": 2, "group_size": 2, "eval_limit": 0, "max_completion_length": 96,
                        "tools": ["calculator"], "max_tool_calling_iterations": 2, "reward_functions": ["length"],
                        "adapter_path": str(tmp_path / "run")})  # fmt: skip
    assert cfg.max_turns == 2
    adapter_config = add_adapters(model, cfg)
    from grpo_mlx import prompts
    from grpo_mlx.tools import tool_schema

    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}] * 2
    train = prompts.prepare_examples(rows, tok, tools=[tool_schema(calculator)])
    assert "calculator" in train[0]["prompt_text"]  # the template shows the tool
    t = Trainer.from_parts(cfg, model, tok, train, adapter_config=adapter_config)
    assert t.agent is not None
    real = episodes.generate_episodes
    forced = script([[ids(tok, CALL), answer], [answer], [ids(tok, CALL), answer], [ids(tok, BAD_CALL), answer]])
    monkeypatch.setattr(episodes, "generate_episodes", lambda *a, **k: real(*a, **k, force=forced))
    before = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    done = []
    t.bus.subscribe(done.append)
    metrics = t.train_step(0)
    assert metrics["tools/calls"] == 0.75 and metrics["tools/errors"] == 0.25 and metrics["tools/turns"] == 1.75
    assert np.isfinite(metrics[M.LOSS])
    (samples,) = [e for e in done if e["type"] == "samples"]  # samples.jsonl's rows: the episode as turns
    first = samples["groups"][0]["completions"]
    assert [t["role"] for t in first[0]["turns"]] == ["tool_call", "tool", "assistant"]
    assert first[1]["turns"] == [episodes.turn_entry("assistant", "5")]
    after = dict(tree_flatten(model.trainable_parameters()))
    assert any(not np.array_equal(before[k], np.array(after[k])) for k in before)


def test_make_batch_keeps_the_environment_mask(setup):
    from grpo_mlx.batch import Group
    from grpo_mlx.rewards import RewardResult

    tok, *_, prompt = setup
    roll, _ = run(setup, [[ids(tok, CALL), ids(tok, " 5") + [eos(tok)]], [ids(tok, " 5") + [eos(tok)]]])
    res = RewardResult({"r": np.zeros(2)}, np.zeros(2))
    plain = roll.select(slice(0, 2), len(prompt))
    plain.env_mask = None
    groups = [Group({"prompt_ids": prompt}, roll, res, False), Group({"prompt_ids": prompt}, plain, res, False)]
    batch = make_batch(groups, 2, 0)
    m = np.array(batch.mask)[:, : roll.tokens.shape[1]]
    assert m[0].sum() == (~roll.env_mask[0] & (np.arange(roll.tokens.shape[1]) < roll.lengths[0])).sum()
    assert m[2].sum() == roll.lengths[0]  # without an environment mask every completion token trains


def test_agent_is_none_without_tools():
    from grpo_mlx.config import build_config

    assert Agent.from_config(build_config({}), tokenizer=None) is None


WALLET = '''
import random


class Wallet:
    """A tiny environment: reset reads the row, deposit is its tool, get_reward checks the balance."""

    instances = []

    def __init__(self):
        self.balance, self.closed = 0, False
        Wallet.instances.append(self)

    def reset(self, **row):
        self.target = int(row["answer"])
        return RESET_TEXT()

    def deposit(self, amount: int) -> str:
        """Put money in the wallet.

        Args:
            amount: How much to put in.
        """
        self.balance += amount
        return f"balance {self.balance}"

    def get_reward(self):
        return float(self.balance == self.target)

    def close(self):
        self.closed = True


def RESET_TEXT():
    return " (You have a wallet.)"


class Moody(Wallet):
    def reset(self, **row):
        super().reset(**row)
        return random.choice([" a", " b", " c", " d", " e", " f"])
'''
DEPOSIT = '<tool_call>\n{"name": "deposit", "arguments": {"amount": 5}}\n</tool_call>'


def env_trainer(setup, tmp_path, cls):
    from grpo_mlx import prompts
    from grpo_mlx.config import build_config
    from grpo_mlx.policy import add_adapters
    from grpo_mlx.testing import build_random_model
    from grpo_mlx.trainer import Trainer

    tok = setup[0]
    (tmp_path / "wallet_env.py").write_text(WALLET)
    mx.random.seed(2)
    model, _ = build_random_model(f"tiny:vocab_size={len(tok.vocab)}")
    cfg = build_config({"batch_size": 2, "group_size": 2, "eval_limit": 0, "max_completion_length": 96,
                        "environment_factory": f"{tmp_path / 'wallet_env.py'}:{cls}",
                        "reward_functions": ["environment"], "adapter_path": str(tmp_path / "run")})  # fmt: skip
    adapter_config = add_adapters(model, cfg)
    t = Trainer.from_parts(cfg, model, tok, [], adapter_config=adapter_config)
    rows = [{"prompt": "Put 5 in.", "answer": "5"}, {"prompt": "Make it 5.", "answer": "5"}]
    t.train_examples = prompts.prepare_examples(rows, tok, tools=t.agent.schemas)
    return t


def test_an_environment_per_episode_gives_tools_prompt_text_and_rewards(setup, tmp_path, monkeypatch):
    from grpo_mlx import metric_names as M

    tok = setup[0]
    t = env_trainer(setup, tmp_path, "Wallet")
    assert "deposit" in t.train_examples[0]["prompt_text"] and t.agent.environment.instances[-1].closed  # the probe
    t.agent.environment.instances.clear()
    answer = ids(tok, " done") + [eos(tok)]
    real = episodes.generate_episodes
    seen = {}

    def spy(model, tokenizer, prompts, *a, **k):
        seen["prompts"] = [tokenizer.decode(p) for p in prompts]
        return real(model, tokenizer, prompts, *a, **k, force=script([[ids(tok, DEPOSIT), answer]] + [[answer]] * 3))

    monkeypatch.setattr(episodes, "generate_episodes", spy)
    metrics = t.train_step(0)
    envs = t.agent.environment.instances
    assert len(envs) == 4 and all(e.closed for e in envs) and not t.agent.live
    assert all(p.rstrip().endswith("(You have a wallet.)<|im_end|><|im_start|>assistant") for p in seen["prompts"])
    assert [e.balance for e in envs] == [5, 0, 0, 0] and {e.target for e in envs} == {5}  # reset read the row
    assert metrics[M.REWARD] == 0.25  # the mean of the episodes' get_reward()
    assert metrics["tools/calls"] == 0.25 and metrics["tools/errors"] == 0.0


def test_an_environment_whose_reset_differs_within_a_group_is_refused(setup, tmp_path):
    from grpo_mlx.errors import UserError

    t = env_trainer(setup, tmp_path, "Moody")
    mx.random.seed(0)
    with pytest.raises(UserError, match="different texts"):
        t.sample(list(t.train_examples), [0, 1])
    assert all(e.closed for e in t.agent.environment.instances)


def test_the_real_sampler_runs_an_episode_a_rigged_model_writes(setup):
    """No scripted picks: a model whose logits favour, by position, the tokens of a known episode
    (call, the calculator's result as the template appends it, an answer, EOS). The sampler
    itself draws the call, the loop runs it, appends the result and the model answers."""
    import mlx.nn as nn

    tok, model, box, renderer, prompt = setup
    call = ids(tok, CALL)
    suffix = ids(tok, renderer.suffix([("calculator", "5")], ended_with=call[-1]))
    answer = ids(tok, " It is 5.") + [eos(tok)]
    target = prompt + call + suffix + answer

    class Rigged(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        @property
        def layers(self):  # what mlx-lm's make_prompt_cache reads
            return self.inner.layers

        def __call__(self, x, cache=None):
            logits = self.inner(x, cache=cache)  # (n, L, V)
            offset = np.asarray(cache[0].offset)  # (n,) tokens each row holds: the next one's position
            want = np.array([target[min(int(o), len(target) - 1)] for o in offset])  # (n,)
            bias = np.zeros((len(want), 1, logits.shape[-1]), np.float32)
            bias[np.arange(len(want)), 0, want] = 40.0
            return logits + mx.array(bias)

    roll, stats = generate_episodes(Rigged(model), tok, [prompt], 3, 120, box, renderer, temperature=1.0, seeds=[5])
    for r in range(3):
        assert roll.tokens[r, : roll.lengths[r]].tolist() == call + suffix + answer
        assert roll.env_mask[r].sum() == len(suffix) and roll.finish_reasons[r] == "stop"
    assert stats.calls.tolist() == [1, 1, 1] and stats.errors.tolist() == [0, 0, 0]
    assert roll.texts[0].endswith("It is 5.")


def test_the_environment_reward_does_not_apply_without_episodes():
    from grpo_mlx.rewards import resolve_reward

    class Env:
        def get_reward(self):
            return 0.5

    _, fn = resolve_reward("environment")
    assert fn(prompts=["p"] * 2, completions=["a", "b"]) == [None, None]  # a single-turn evaluation
    assert fn(prompts=["p"] * 2, completions=["a", "b"], environments=[Env(), Env()]) == [0.5, 0.5]


def tool_model_dir(path):
    """A model directory mlx_lm.load reads: the tiny llama's weights and config beside the tool tokenizer."""
    import json

    from grpo_mlx.testing import PRESETS, build_random_model, build_tool_tokenizer

    tok = build_tool_tokenizer(path)
    config = {"model_type": "llama", **PRESETS["tiny"][1], "vocab_size": len(tok.vocab)}
    mx.random.seed(4)
    model, _ = build_random_model(f"tiny:vocab_size={len(tok.vocab)}")
    model.save_weights(str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return tok


def test_a_resumed_multi_turn_run_continues_exactly(tmp_path, monkeypatch):
    """Tools on (every other episode calls the calculator, scripted by position only): 10 steps,
    a stop, then 10 resumed steps end with the adapters, rewards and tool figures of 20 straight
    steps (each prompt's random numbers are keyed by its place in the data stream)."""
    import json

    from grpo_mlx.config import build_config
    from grpo_mlx.events import EventBus, read_jsonl
    from grpo_mlx.trainer import Trainer

    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    model_dir.mkdir()
    data_dir.mkdir()
    tok = tool_model_dir(model_dir)
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (12, 30), (7, 8), (1, 1)]]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    call = ids(tok, CALL)

    def force(rows, pos):  # a pure function of (row, position): the same script on every step and run
        return np.array([call[p] if r % 2 == 0 and p < len(call) else -1 for r, p in zip(rows, pos)])

    real = episodes.generate_episodes
    monkeypatch.setattr(episodes, "generate_episodes", lambda *a, **k: real(*a, **k, force=force))

    def config(run, **more):
        return build_config({"model": str(model_dir), "data": str(data_dir), "adapter_path": str(run), "iters": 20,
                             "batch_size": 2, "group_size": 2, "eval_limit": 0, "save_every": 100,
                             "max_completion_length": 64, "learning_rate": 5e-3, "tools": ["calculator"],
                             "reward_functions": ["length"], **more})  # fmt: skip

    Trainer(config(tmp_path / "a")).run()
    bus = EventBus()
    interrupted = Trainer(config(tmp_path / "b"), bus)
    bus.subscribe(lambda e: e["type"] == "step" and e["step"] == 10 and interrupted.control.stop.set())
    assert interrupted.run()["steps"] == 10
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert Trainer(build_config({"resume": str(tmp_path / "b")}, base=saved)).run()["steps"] == 20

    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, err_msg=k)

    def steps(run):
        return [e["metrics"] for e in read_jsonl(str(run / "metrics.jsonl")) if e["type"] == "step"]

    straight, resumed = steps(tmp_path / "a"), steps(tmp_path / "b")
    assert len(resumed) == len(straight) == 20
    for key in ("reward", "tools/calls", "tools/turns", "completions/mean_length"):
        assert [m[key] for m in straight] == [m[key] for m in resumed], key
    assert all(m["tools/calls"] >= 0.5 and m["tools/turns"] >= 1.5 for m in straight)  # the episodes called the tool
