"""Tools: the safe calculator, loading specs, schemas, running calls (sync, async, timeouts,
errors) and reading calls with mlx-lm's parsers of three model families' formats."""

import asyncio
import shutil
import sys
import threading

import pytest

from grpo_mlx.tools import Call, Toolbox, ToolSpecError, calculator, parse_calls, resolve_tool, tool_schema


def test_calculator_does_arithmetic_and_nothing_else():
    assert calculator("12 * (3 + 4)") == "84"
    assert calculator("7 / 2") == "3.5" and calculator("-2 ** 3") == "-8" and calculator("6 / 3") == "2"
    for bad in ("__import__('os').system('true')", "x + 1", "[1, 2]", "'a' * 3"):
        with pytest.raises(ValueError, match="not arithmetic"):
            calculator(bad)
    with pytest.raises(ValueError, match="too large"):
        calculator("9 ** 9 ** 9")


def test_a_tool_spec_loads_a_file_function_with_its_schema(tmp_path):
    f = tmp_path / "my_tools.py"
    f.write_text(
        "def lookup(word: str) -> str:\n"
        '    """Look a word up.\n\n    Args:\n        word: The word.\n    """\n'
        "    return word.upper()\n"
        "def untyped(x):\n    return x\n"
    )
    fn = resolve_tool(f"{f}:lookup")
    schema = tool_schema(fn)
    assert schema["function"]["name"] == "lookup"
    assert schema["function"]["parameters"]["properties"]["word"]["type"] == "string"
    assert resolve_tool("calculator") is calculator
    with pytest.raises(ToolSpecError, match="tool .*no schema"):
        Toolbox.from_specs([f"{f}:untyped"])
    with pytest.raises(ToolSpecError, match="tool .*no 'lokup'.*did you mean 'lookup'"):
        resolve_tool(f"{f}:lokup")
    with pytest.raises(ToolSpecError, match="unknown built-in tool"):
        resolve_tool("calculater")


def test_calls_run_together_and_failures_go_back_to_the_model():
    both = threading.Barrier(2, timeout=10)  # passes only if two sync calls run at the same time
    release = threading.Event()

    def meet(tag: str) -> str:
        both.wait()
        return tag

    async def wait(seconds: float) -> dict:
        await asyncio.sleep(seconds)
        return {"waited": seconds}

    def broken() -> str:
        raise KeyError("missing")

    def hang() -> str:
        release.wait(30)
        return "late"

    box = Toolbox({"meet": meet, "wait": wait, "broken": broken, "hang": hang}, timeout=1.0)
    calls = [Call("meet", {"tag": "a"}), Call("wait", {"seconds": 0.01}), Call("meet", {"tag": "b"}),
             Call("broken"), Call("nope"), Call("hang"), Call("?", parse_error="bad json"),
             Call("meet", {"bogus": 1})]  # fmt: skip
    try:
        out = box.run(calls)
        assert not release.is_set()  # it came back while the hung call still runs
    finally:
        release.set()
    assert [o.content for o in out[:3]] == ["a", '{"waited": 0.01}', "b"]
    assert [o.error for o in out] == [False, False, False, True, True, True, True, True]
    assert "KeyError" in out[3].content and "no tool named 'nope'" in out[4].content
    assert "longer than 1 s" in out[5].content and "could not be parsed: bad json" in out[6].content
    assert "TypeError" in out[7].content


@pytest.mark.parametrize(
    "parser, start, end, text",
    [
        ("json_tools", "<tool_call>", "</tool_call>",
         'Let me compute. <tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call>'),
        ("pythonic", "<|tool_call_start|>", "<|tool_call_end|>",
         '<|tool_call_start|>[calculator(expression="2 + 3")]<|tool_call_end|>'),
        ("qwen3_coder", "<tool_call>", "</tool_call>",
         "<tool_call>\n<function=calculator>\n<parameter=expression>\n2 + 3\n</parameter>\n</function>\n</tool_call>"),
        ("mistral", "[TOOL_CALLS]", "", '[TOOL_CALLS][{"name": "calculator", "arguments": {"expression": "2 + 3"}}]'),
    ],
)  # fmt: skip
def test_calls_are_read_by_mlx_lm_parsers(parser, start, end, text):
    import importlib

    module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
    assert (module.tool_call_start, module.tool_call_end) == (start, end)
    calls = parse_calls(text, start, end, module.parse_tool_call, [tool_schema(calculator)])
    assert [(c.name, c.arguments, c.parse_error) for c in calls] == [("calculator", {"expression": "2 + 3"}, "")]


def test_two_calls_and_a_broken_one_in_one_turn():
    import mlx_lm.tool_parsers.json_tools as jt

    text = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call> then <tool_call>{"name": "b", "arguments": '
        '"{\\"x\\": 1}"}</tool_call> <tool_call>{oops</tool_call>'
    )
    calls = parse_calls(text, jt.tool_call_start, jt.tool_call_end, jt.parse_tool_call, [])
    assert [(c.name, c.arguments) for c in calls[:2]] == [("a", {}), ("b", {"x": 1})]
    assert calls[2].parse_error.startswith("JSONDecodeError")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and shutil.which("bwrap")), reason="needs bubblewrap")
def test_the_python_tool_runs_code_in_the_sandbox():
    from grpo_mlx.tools import python

    assert python("print(6 * 7)") == "42"
    assert "ZeroDivisionError" in python("1 / 0")
    out = python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)")
    assert "Error" in out  # no network inside
