"""Resolving a reward spec: a built-in name ("accuracy"), "path/to/file.py:fn" or
"package.module:fn". Custom functions are used as they are; factory options apply to built-ins.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from grpo_mlx.rewards.builtin import BUILTIN_REWARDS, RewardFn
from grpo_mlx.rewards.errors import RewardSpecError

# Resolving a spec: "accuracy", "path/to/file.py:fn" or "package.module:fn"


def _load_failure(spec: str, what: str, e: Exception, kind: str = "reward", error=RewardSpecError) -> Exception:
    if isinstance(e, SyntaxError):  # name the file that is broken, which may be a helper it imports
        return error(f"{kind} {spec!r}: syntax error in {e.filename} line {e.lineno}: {e.msg}")
    return error(f"{kind} {spec!r}: cannot import {what}: {type(e).__name__}: {e}")


def _load_file(spec: str, path: Path, kind: str = "reward", error=RewardSpecError):
    if not path.is_file():
        raise error(f"{kind} {spec!r}: file not found: {path}")
    name = f"grpo_mlx_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle look the module up by name
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # as with `python file.py`, the files beside it are importable
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise _load_failure(spec, f"file {str(path)!r}", e, kind, error) from e
    finally:
        sys.path.remove(folder)
    return module


def _import_module(spec: str, dotted: str, kind: str = "reward", error=RewardSpecError):
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # a console script does not see the working directory; users expect it to
        sys.path.append(cwd)
    try:
        return importlib.import_module(dotted)
    except Exception as e:
        raise _load_failure(spec, f"module {dotted!r}", e, kind, error) from e
    finally:
        if added:
            sys.path.remove(cwd)


def _suggest(name: str, choices: list[str]) -> str:
    import difflib  # only on the error path

    # difflib misses a mere prefix ("shout" for "shout_reward"); look for one of those too.
    close = difflib.get_close_matches(name, choices, n=1) or [c for c in choices if c.startswith(name)]
    return f"did you mean {close[0]!r}? " if close else ""


def resolve_reward(spec: str, **options) -> tuple[str, RewardFn]:
    """A (display name, reward function) for a built-in name, `file.py:fn` or `module:fn`."""
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return spec, BUILTIN_REWARDS[spec](**options)
    if ":" not in spec:
        hint = (
            "name the function: file.py:function"
            if spec.endswith(".py")
            else f"unknown built-in reward; {_suggest(spec, list(BUILTIN_REWARDS))}built-ins: "
            f"{', '.join(BUILTIN_REWARDS)}; custom: path/to/file.py:function or package.module:function"
        )
        raise RewardSpecError(f"reward {spec!r}: {hint}")
    return load_callable(spec)


def load_callable(spec: str, kind: str = "reward", error=RewardSpecError, want=callable, what: str = "function"):
    """(name, object) named by `file.py:name` or `module:name` (a reward, a tool, an
    environment class); errors name the `kind` and are raised as `error`."""
    spec = spec.strip()
    if ":" not in spec:
        raise error(f"{kind} {spec!r}: name the {what}: file.py:name or package.module:name")
    target, attr = spec.rsplit(":", 1)
    if not attr.isidentifier():
        raise error(f"{kind} {spec!r}: {attr!r} after the colon is not a {what} name")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    module = (
        _load_file(spec, Path(target).expanduser(), kind, error)
        if is_file
        else _import_module(spec, target, kind, error)
    )
    if not hasattr(module, attr):
        defined = sorted(
            n
            for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        listing = (
            f"it defines: {', '.join(defined)}"
            if 0 < len(defined) <= 12
            else ("it defines no functions" if not defined else f"it defines {len(defined)} callables")
        )
        raise error(f"{kind} {spec!r}: no {attr!r} in {target}; {_suggest(attr, defined)}{listing}")
    fn = getattr(module, attr)
    if not want(fn):
        raise error(f"{kind} {spec!r}: {attr!r} in {target} is a {type(fn).__name__}, not a {what}")
    return getattr(fn, "__name__", attr), fn
