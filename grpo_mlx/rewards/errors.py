"""The two ways a reward goes wrong, both shown to the user as one sentence."""

from __future__ import annotations

from grpo_mlx.errors import UserError


class RewardSpecError(UserError, ValueError):
    """A reward spec (built-in name, file.py:fn, module:fn) cannot be resolved."""


#


class RewardFunctionError(UserError, RuntimeError):
    """A reward function raised or returned something unusable; the trainer stops cleanly."""

    def __init__(self, message: str, function_name: str, completion: str, index: int | None = None):
        super().__init__(message)
        self.function_name = function_name
        self.completion = completion
        self.index = index


#
