import subprocess
import sys
import textwrap

import numpy as np
import pytest

from grpo_mlx.rewards import (
    BUILTIN_REWARDS,
    RewardFunctionError,
    RewardResult,
    RewardSpecError,
    answers_match,
    completion_text,
    compute_rewards,
    extract_answer,
    resolve_reward,
)


def chat(text):
    return [{"role": "assistant", "content": text}]


# --- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{ {a}{b{c}} } tail", "{a}{b{c}}"),
        (r"\boxed{7} and a truncated \boxed{\frac{1}{", "7"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("#### $1,234.", "1,234"),
        ("<answer> 17 </answer>", "17"),
        ("<answer>a</answer> then <answer>\nParis\n</answer>", "Paris"),
        ("The answer: 5 apples and 12 pears.", "12"),
        ("It is -3.", "-3"),
        ("temperature went from 2 to -7.5 degrees", "-7.5"),
        ("between 3-4 hours", "4"),
        ("she paid $1,250,000 in total", "1,250,000"),
        ("0.25 of it", "0.25"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_precedence():
    # boxed beats ####, #### beats tags, tags beat a later bare number
    assert extract_answer(r"#### 3 \boxed{4}") == "4"
    assert extract_answer("<answer>5</answer>\n#### 6") == "6"
    assert extract_answer("<answer>5</answer> and then 9") == "5"
    assert extract_answer("<answer>  </answer> 8") == "8"  # empty tag falls through
    # a markdown heading is not a GSM8K answer line, but a final "#### Paris" is
    assert extract_answer("#### Step 1: add\n3 + 4 = 7\n#### Step 2: done\nso 7") == "7"
    assert extract_answer("<answer>5</answer>\n#### Paris\n") == "Paris"


def test_completion_text_forms():
    assert completion_text("hi") == "hi"
    assert completion_text(chat("hi")) == "hi"
    assert completion_text({"role": "assistant", "content": "x"}) == "x"
    assert (
        completion_text(
            [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        )
        == "ab"
    )
    assert extract_answer(chat(r"\boxed{3}")) == "3"


# --- matching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("46", "46.0"),
        ("46.00", 46),
        ("1,000", "1000"),
        ("1000", 1000.0),
        ("$18", "18"),
        ("-3", -3),
        ("0.5", "1/2"),
        (r"\frac{3}{4}", "0.75"),
        ("1/3", 1 / 3),
        ("50%", "50"),
        ("72", "Natalia sold 48 clips...\n#### 72"),
        (" Paris ", "paris"),
        ("New  York", "new york"),
        ("1000000.0000001", "1000000"),  # within 1e-6 relative
    ],
)
def test_answers_match_true(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("46", "47"),
        ("0.5", "0.51"),
        ("-3", "3"),
        (None, "3"),
        ("3", None),
        ("Paris", "London"),
        ("1,2", "12"),
        ("1/0", "0"),
        ("1000", "1001"),
        ("12", "#### 13"),
    ],
)
def test_answers_match_false(predicted, reference):
    assert not answers_match(predicted, reference)


# --- built-ins --------------------------------------------------------------------------------


def build(name, **options):
    return BUILTIN_REWARDS[name](max_completion_length=options.pop("max_completion_length", 10), **options)


def test_accuracy_plain_and_conversational():
    fn = build("accuracy")
    completions = [r"\boxed{72}", "I think 71", "#### 72.0", "nothing", "x"]
    assert fn([""] * 5, completions, answer=["72", "72", 72, "72", None]) == [1.0, 0.0, 1.0, 0.0, None]
    convo = [chat(c) for c in completions[:2]]
    prompts = [[{"role": "user", "content": "q"}]] * 2
    assert fn(prompts, convo, answer=["#### 72", "72"]) == [1.0, 0.0]
    assert fn(["p"], ["3"]) == [None]  # no answer column at all
    assert fn(["p"] * 3, ["3"] * 3, answer=[float("nan"), "  ", 3]) == [None, None, 1.0]
    assert build("accuracy", column="solution")(["p"], ["3"], solution=["3"]) == [1.0]


def test_format_strict():
    fn = build("format")
    good = "<think>\nsome reasoning\n</think>\n<answer>42</answer>\n"
    bad = [
        "<answer>42</answer>",  # no think
        "<answer>42</answer><think>x</think>",  # wrong order
        "hello <think>x</think><answer>42</answer>",  # text outside
        "<think>x</think><answer>42</answer> trailing",  # text outside
        "<think>x</think><answer>1</answer><answer>2</answer>",  # two answers
        "<think>x<think>y</think><answer>1</answer>",  # nested tag
        "",
    ]
    assert fn(None, [good, chat(good)] + bad) == [1.0, 1.0] + [0.0] * len(bad)


def test_format_soft_partial_credit():
    fn = build("format_soft")
    assert fn(None, ["<think>a</think> <answer>b</answer>"]) == [1.0]
    assert fn(None, ["<answer>b</answer>"]) == [0.5]  # one answer block, nothing outside
    assert fn(None, ["x <think>a</think><answer>b</answer>"]) == [0.75]  # text outside
    assert fn(None, ["<answer>b</answer><think>a</think>"]) == [0.75]  # wrong order
    assert fn(None, ["plain text"]) == [0.0]
    assert build("format", soft=True)(None, ["<answer>b</answer>"]) == [0.5]


def test_overlong_three_regions_exact():
    # L_max = 20, L_cache = 5: zero up to 15, linear to -1 at 20, -1 beyond
    fn = build("overlong", max_completion_length=20, cache_length=5)
    ids = [[0] * n for n in (0, 15, 16, 18, 20, 21)]
    assert fn(None, ["c"] * 6, completion_ids=ids) == [0.0, 0.0, -0.2, -0.6, -1.0, -1.0]
    default = build("overlong", max_completion_length=8)  # L_cache = 8 // 4 = 2
    assert default(None, ["c"] * 3, completion_ids=[[0] * 6, [0] * 7, [0] * 8]) == [0.0, -0.5, -1.0]


def test_length_reward():
    fn = build("length", max_completion_length=10)
    assert fn(None, ["a", "b", "c"], completion_ids=[[], [1] * 5, [1] * 30]) == [0.0, -0.5, -1.0]


def test_length_rewards_need_ids_and_max_length():
    with pytest.raises(ValueError, match="completion_ids"):
        build("overlong")(None, ["a"])
    with pytest.raises(RewardSpecError, match="max_completion_length"):
        BUILTIN_REWARDS["overlong"]()
    with pytest.raises(RewardSpecError, match="max_completion_length"):
        resolve_reward("length")


# --- resolve_reward ---------------------------------------------------------------------------

TRL_STYLE = """
    def _helper(x):
        return x

    def shout_reward(prompts, completions, **kwargs):
        return [float(c.isupper()) for c in completions]

    def other_reward(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    THRESHOLD = 3
"""


def write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_resolve_builtin_passes_options():
    name, fn = resolve_reward("overlong", max_completion_length=4, cache_length=2)
    assert name == "overlong"
    assert fn(None, ["a", "b"], completion_ids=[[1, 2], [1, 2, 3]]) == [0.0, -0.5]
    name, fn = resolve_reward(" format ", max_completion_length=4)
    assert name == "format" and fn(None, ["<think></think><answer>1</answer>"]) == [1.0]


def test_resolve_file(tmp_path):
    path = write(tmp_path, "my_rewards.py", TRL_STYLE)
    name, fn = resolve_reward(f"{path}:shout_reward", max_completion_length=10)
    assert name == "shout_reward"
    assert fn(["p", "p"], ["YES", "no"]) == [1.0, 0.0]


def test_resolve_file_can_import_its_siblings(tmp_path):
    write(tmp_path, "helpers_for_reward.py", "def score(c):\n    return 2.0\n")
    path = write(
        tmp_path,
        "uses_helper.py",
        """
        from helpers_for_reward import score
        def r(prompts, completions, **kw):
            return [score(c) for c in completions]
    """,
    )
    _, fn = resolve_reward(f"{path}:r")
    assert fn(None, ["a"]) == [2.0]
    assert str(tmp_path) not in sys.path  # the directory is only on the path while loading


def test_resolve_module(tmp_path, monkeypatch):
    write(tmp_path, "grpo_test_reward_mod.py", TRL_STYLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    name, fn = resolve_reward("grpo_test_reward_mod:other_reward")
    assert name == "other_reward" and fn(None, ["a", "b"]) == [0.0, 0.0]


def test_resolve_errors(tmp_path, monkeypatch):
    path = write(tmp_path, "rw.py", TRL_STYLE)

    with pytest.raises(RewardSpecError, match=r"file not found: .*missing\.py"):
        resolve_reward(f"{tmp_path}/missing.py:f")

    with pytest.raises(RewardSpecError) as err:
        resolve_reward(f"{path}:shout")
    message = str(err.value)
    assert "no 'shout'" in message and "did you mean 'shout_reward'" in message
    assert "it defines: other_reward, shout_reward" in message and "_helper" not in message

    with pytest.raises(RewardSpecError, match="'THRESHOLD' .* is a int, not a function"):
        resolve_reward(f"{path}:THRESHOLD")

    with pytest.raises(
        RewardSpecError,
        match=r"cannot import module 'no_such_pkg_xyz\.mod': "
        r"ModuleNotFoundError: No module named 'no_such_pkg_xyz'",
    ):
        resolve_reward("no_such_pkg_xyz.mod:f")

    with pytest.raises(
        RewardSpecError,
        match=r"unknown built-in reward; did you mean 'accuracy'\? "
        r"built-ins: accuracy, format",
    ):
        resolve_reward("acuracy")

    with pytest.raises(RewardSpecError, match="name the function"):
        resolve_reward(str(path))

    with pytest.raises(RewardSpecError, match="'' after the colon is not a function name"):
        resolve_reward(f"{path}:")
    with pytest.raises(RewardSpecError, match="'f-1' after the colon is not a function name"):
        resolve_reward("pkg.mod:f-1")


def test_resolve_syntax_error_names_file_and_line(tmp_path, monkeypatch):
    bad = write(tmp_path, "broken_reward.py", "def f(prompts, completions, **kw):\n    return [\n\nx = = 1\n")
    with pytest.raises(RewardSpecError, match=r"syntax error in .*broken_reward\.py line \d+"):
        resolve_reward(f"{bad}:f")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardSpecError, match=r"syntax error in .*broken_reward\.py line \d+"):
        resolve_reward("broken_reward:f")


def test_resolve_file_raising_on_load(tmp_path):
    path = write(tmp_path, "raises.py", "raise RuntimeError('boom at import')\n")
    with pytest.raises(RewardSpecError, match=r"cannot import file '.*raises\.py': RuntimeError: boom at import"):
        resolve_reward(f"{path}:f")


# --- compute_rewards --------------------------------------------------------------------------


def const(*values):
    def fn(prompts, completions, **kwargs):
        return list(values)

    return fn


def test_compute_rewards_weights_and_none():
    fns = [("a", const(1.0, 0.0, None)), ("b", const(0.5, None, None))]
    result = compute_rewards(fns, [2.0, -1.0], ["p"] * 3, ["x", "y", "z"], {})
    assert isinstance(result, RewardResult)
    np.testing.assert_array_equal(result.per_function["a"], [1.0, 0.0, np.nan])
    np.testing.assert_array_equal(result.per_function["b"], [0.5, np.nan, np.nan])
    np.testing.assert_allclose(result.total, [1.5, 0.0, 0.0])  # None adds nothing
    assert result.total.dtype == np.float64 and result.per_function["a"].shape == (3,)


def test_compute_rewards_defaults_and_types():
    fns = [("a", const(True, 2, np.float32(0.5))), ("a", lambda prompts, completions, **kw: np.ones(3))]
    result = compute_rewards(fns, None, ["p"] * 3, ["x"] * 3, {})
    assert list(result.per_function) == ["a", "a_2"]  # duplicate names stay distinct
    np.testing.assert_allclose(result.total, [2.0, 3.0, 1.5])


def test_compute_rewards_passes_columns():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs, prompts=prompts)
        return [0.0] * len(completions)

    compute_rewards(
        [("spy", spy)], None, ["p1", "p2"], ["c1", "c2"], {"answer": ["1", "2"], "completion_ids": [[1], [2, 3]]}
    )
    trl_extras = {k: seen.pop(k) for k in ("trainer_state", "log_metric", "log_extra")}  # TRL 1.16's extra keywords
    assert seen == {"answer": ["1", "2"], "completion_ids": [[1], [2, 3]], "prompts": ["p1", "p2"]}
    assert trl_extras["trainer_state"].global_step == 0 and callable(trl_extras["log_metric"])


def test_compute_rewards_builtins_end_to_end():
    fns = [resolve_reward(n, max_completion_length=4) for n in ("accuracy", "format", "overlong")]
    completions = [chat("<think>t</think><answer>7</answer>"), chat("8")]
    result = compute_rewards(
        fns,
        [1.0, 0.5, 1.0],
        [[{"role": "user", "content": "q"}]] * 2,
        completions,
        {"answer": ["7", "7"], "completion_ids": [[1, 2], [1, 2, 3, 4]]},
    )
    np.testing.assert_allclose(result.total, [1.5, -1.0])


def test_compute_rewards_weight_count_mismatch():
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        compute_rewards([("a", const(1.0))], [1.0, 2.0], ["p"], ["x"], {})


@pytest.mark.parametrize(
    "returned, pattern, index",
    [
        ([1.0, 2.0], r"reward function 'bad' returned 2 values for 3 completions", None),
        ({"a": 1}, r"returned a dict, expected a list of 3 floats", None),
        (1.0, r"returned a float", None),
        ([0.0, float("nan"), 1.0], r"returned nan for completion 1 \(on completion: 'second'\)", 1),
        ([0.0, 1.0, float("inf")], r"returned inf for completion 2", 2),
        ([0.0, "1", 1.0], r"returned '1' \(str\) for completion 1", 1),
        (np.zeros((3, 1)), r"returned a ndarray", None),
    ],
)
def test_compute_rewards_invalid_results(returned, pattern, index):
    with pytest.raises(RewardFunctionError, match=pattern) as err:
        compute_rewards(
            [("bad", lambda prompts, completions, **kw: returned)],
            None,
            ["p"] * 3,
            ["first", chat("second"), "third"],
            {},
        )
    assert err.value.function_name == "bad"
    assert err.value.completion == ["first", "second", "third"][index or 0]
    assert err.value.index == index


def test_compute_rewards_function_raises():
    def my_fn(prompts, completions, **kwargs):
        return [1 / 0 for _ in completions]

    completion = "x" * 500
    with pytest.raises(RewardFunctionError) as err:
        compute_rewards([("my_fn", my_fn)], None, ["p"], [completion], {})
    message = str(err.value)
    assert message.startswith(
        "reward function 'my_fn' failed: ZeroDivisionError: division by zero (on completion: 'xxx"
    )
    assert len(message) < 300  # the completion is cut to 200 characters
    assert err.value.completion == completion and isinstance(err.value.__cause__, ZeroDivisionError)
    assert isinstance(err.value, RuntimeError)


def test_compute_rewards_empty_batch():
    result = compute_rewards([("a", const())], None, [], [], {})
    assert result.total.shape == (0,) and result.per_function["a"].shape == (0,)


def test_module_imports_no_mlx():
    code = "import sys, grpo_mlx.rewards; assert not any(m.startswith('mlx') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- a function that exits or interrupts is a failing function --------------------------------


def _exits(prompts, completions, **kw):
    sys.exit(3)


def _system_exit(prompts, completions, **kw):
    raise SystemExit("bye")


def _interrupts(prompts, completions, **kw):
    raise KeyboardInterrupt


@pytest.mark.parametrize("timeout", [0, 5.0])  # called directly, and in the timeout's worker thread
@pytest.mark.parametrize(
    "fn, expected",
    [(_exits, "called sys.exit(3)"), (_system_exit, "sys.exit('bye')"), (_interrupts, "KeyboardInterrupt")],
)
def test_exit_and_interrupt_in_a_reward_are_its_failure(fn, expected, timeout):
    with pytest.raises(RewardFunctionError) as e:
        compute_rewards([(fn.__name__, fn)], None, ["p"], ["c"], {}, timeout=timeout)
    assert fn.__name__ in str(e.value) and expected in str(e.value)


# --- lists of answers ---------------------------------------------------------------------------


def test_a_list_of_answers_means_any_of_them():
    assert answers_match("4", ["four", 4])
    assert answers_match("four", ["four", 4])
    assert not answers_match("5", ["four", 4])
    assert answers_match("1,000", [999, "1000"])
    fn = BUILTIN_REWARDS["accuracy"]()
    assert fn(["p", "p"], ["so 4", "so 5"], answer=[[4, "four"], [4, "four"]]) == [1.0, 0.0]


def test_an_object_answer_is_refused_not_compared_as_text():
    with pytest.raises(TypeError, match="object"):
        answers_match("{'a': 1}", {"a": 1})


def test_gsm8k_answer_with_a_unit():
    assert extract_answer("She pays 6 * 9 = 54.\n#### 54 dollars") == "54"
    assert extract_answer("#### 18 per hour\n") == "18"
    assert answers_match(extract_answer("so\n#### 54 dollars"), "54")
    assert answers_match("54", "Natalia ...\n#### 54 dollars"), "a reference with a unit too"
    # more than a unit after the number is a heading, not the answer
    assert extract_answer("#### 3 steps to solve it\nfirst 4 + 5 = 9") == "9"
