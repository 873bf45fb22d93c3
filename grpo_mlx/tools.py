"""Tools the model may call during an episode: loading them, their schemas, running a turn's calls.

A tool is a plain Python function with type hints and a Google-style docstring, as TRL takes
them: `transformers.utils.get_json_schema` turns it into the schema chat templates render
(`apply_chat_template(..., tools=[schema])`). Specs: `file.py:fn`, `module:fn`, or a built-in
name (`python`, `calculator`). A turn's calls run together (sync tools in threads, `async def`
ones on one event loop), each with a time limit; a tool that raises or times out returns its
error text to the model, as a tool message, and is counted. No MLX here.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import inspect
import json
import math
import operator
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from grpo_mlx.errors import UserError


class ToolSpecError(UserError, ValueError):
    """A tool spec (built-in name, file.py:fn, module:fn) cannot be resolved or has no schema."""


# ------------------------------------------------------------------ built-in tools


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_POWER = 1000  # 9**9**9 would hang the trainer: exponents stay small


def _arith(node):
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
            raise ValueError(f"exponent {right} is too large (at most {MAX_POWER})")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_arith(node.operand))
    raise ValueError(f"not arithmetic: {ast.unparse(node)!r} (numbers, + - * / // % ** and parentheses only)")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: An arithmetic expression of numbers, + - * / // % ** and parentheses, e.g. "12 * (3 + 4)".
    """
    # parsed, never eval'd: only number literals and arithmetic operators are accepted
    value = _arith(ast.parse(expression.strip(), mode="eval"))
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)
    return str(value)


def python(code: str) -> str:
    """Run a Python program in a sandbox and return what it printed.

    Args:
        code: The program's source code; print the results you need.
    """
    from grpo_mlx import sandbox  # the OS sandbox (no network, a fresh work dir, limits)

    result = sandbox.run(sandbox.extract_code(code) or code, limits=sandbox.Limits(timeout=5.0))
    out = result.stdout
    if result.status != "ok":
        out += result.stderr[-2000:] + (f"\n[{result.status}: {result.reason}]" if result.reason else "")
    return out.strip() or "(no output)"


BUILTIN_TOOLS: dict[str, Callable] = {"python": python, "calculator": calculator}


# ------------------------------------------------------------------ loading


def resolve_tool(spec: str) -> Callable:
    """The function a tool spec names: a built-in name, `file.py:fn` or `module:fn`."""
    from grpo_mlx.rewards.loading import load_callable  # the loader custom rewards use

    spec = spec.strip()
    if spec in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[spec]
    if ":" not in spec:
        raise ToolSpecError(
            f"tool {spec!r}: unknown built-in tool (built-ins: {', '.join(BUILTIN_TOOLS)}); "
            "custom: path/to/file.py:function or package.module:function"
        )
    return load_callable(spec, kind="tool", error=ToolSpecError)[1]


def tool_schema(fn: Callable, where: str = "") -> dict:
    """The JSON schema chat templates render for `fn` (transformers' get_json_schema)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # no docstring, an argument without a type hint or description
        name = getattr(fn, "__name__", repr(fn))
        raise ToolSpecError(
            f"tool {where or name!r}: no schema can be made for {name}: {e} "
            "(a tool needs type hints and a Google-style docstring with an Args: section)"
        ) from None


@dataclass
class Call:
    """One tool call of a turn, as the tool parser read it (or why it could not)."""

    name: str
    arguments: dict = field(default_factory=dict)
    parse_error: str = ""  # set when the call text could not be parsed


@dataclass
class Outcome:
    name: str
    content: str  # what goes back to the model as the tool message
    error: bool  # the tool raised, timed out, did not exist, or the call did not parse


@dataclass
class Toolbox:
    """The tools of a run (name -> function), their schemas, and a per-call time limit."""

    functions: dict[str, Callable]
    timeout: float = 30.0  # seconds per call; 0 = no limit
    # sync tools run here, not in asyncio's default executor, whose shutdown would wait for a
    # call that timed out but is still running (a thread cannot be killed; it is left to finish)
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(32, "grpo-mlx-tool"), repr=False)

    @classmethod
    def from_specs(cls, specs: list[str], timeout: float = 30.0) -> Toolbox:
        functions = {}
        for spec in specs:
            fn = resolve_tool(spec)
            tool_schema(fn, spec)  # refuse now, not in the first step
            functions[fn.__name__] = fn
        return cls(functions, timeout)

    @property
    def schemas(self) -> list[dict]:
        return [tool_schema(fn) for fn in self.functions.values()]

    def run(self, calls: list[Call]) -> list[Outcome]:
        """Every call of a turn (of every row), concurrently; results in order."""
        return run_calls([(self, c) for c in calls])

    async def _run_one(self, call: Call) -> Outcome:
        if call.parse_error:
            return Outcome(call.name, f"Error: the tool call could not be parsed: {call.parse_error}", True)
        fn = self.functions.get(call.name)
        if fn is None:
            known = ", ".join(self.functions) or "none"
            return Outcome(call.name, f"Error: there is no tool named {call.name!r} (tools: {known})", True)
        try:
            if inspect.iscoroutinefunction(fn):
                work = fn(**call.arguments)
            else:  # a thread each: one slow tool does not hold up the others
                work = asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, **call.arguments))
            value = await (asyncio.wait_for(work, self.timeout) if self.timeout > 0 else work)
        except asyncio.TimeoutError:
            return Outcome(call.name, f"Error: {call.name} took longer than {self.timeout:g} s", True)
        except Exception as e:  # the model sees what went wrong, as it would from a real tool
            return Outcome(call.name, f"Error: {type(e).__name__}: {e}", True)
        return Outcome(call.name, value if isinstance(value, str) else json.dumps(value, default=str), False)


def run_calls(pairs: list[tuple[Toolbox, Call]]) -> list[Outcome]:
    """Calls, each on its own toolbox (an episode's environment), all concurrently; in order."""
    if not pairs:
        return []

    async def together():
        return list(await asyncio.gather(*(box._run_one(call) for box, call in pairs)))

    return asyncio.run(together())


NOT_TOOLS = ("reset", "get_reward", "close")  # the environment contract's own methods


def environment_tools(env) -> dict[str, Callable]:
    """An environment's tools: its public methods besides reset, get_reward and close (TRL's rule)."""
    names = [n for n in dir(type(env)) if not n.startswith("_") and n not in NOT_TOOLS]
    return {n: getattr(env, n) for n in names if callable(getattr(env, n))}


def resolve_environment(spec: str):
    """The environment class (or factory) a spec names: `file.py:Class` or `module:Class`."""
    from grpo_mlx.rewards.loading import load_callable

    return load_callable(spec, kind="environment", error=ToolSpecError, what="class")[1]


def parse_calls(text: str, start: str, end: str, parser: Callable, schemas: list[dict]) -> list[Call]:
    """The tool calls in a turn's text: each span between the `start` and `end` markers (to the
    end of the text when `end` is empty) read by the tokenizer's tool parser (mlx-lm's)."""
    calls, pos = [], 0
    while start and (i := text.find(start, pos)) >= 0:
        j = text.find(end, i + len(start)) if end else -1
        body = text[i + len(start) : j if j >= 0 else len(text)]
        pos = j + len(end) if j >= 0 else len(text)
        try:
            parsed = parser(body, schemas)
        except Exception as e:
            calls.append(Call("?", parse_error=f"{type(e).__name__}: {e}"))
            continue
        for item in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(item, dict) or "name" not in item:
                calls.append(Call("?", parse_error=f"the parser returned {item!r:.80}"))
                continue
            args = item.get("arguments") or {}
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError as e:
                    calls.append(Call(str(item["name"]), parse_error=f"arguments are not JSON: {e}"))
                    continue
            if not isinstance(args, dict):
                calls.append(Call(str(item["name"]), parse_error=f"arguments are a {type(args).__name__}"))
                continue
            calls.append(Call(str(item["name"]), args))
        if j < 0:
            break
    return calls
