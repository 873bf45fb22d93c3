"""The one base class of every error that means "the user's input or environment is wrong".

The CLI and the TUI print such an error as its one sentence, with no traceback, and exit
non-zero; anything else is a bug and keeps its traceback. No MLX import here.
"""


class UserError(Exception):
    """Bad input, a missing dependency or an environment fault, stated in one sentence."""
