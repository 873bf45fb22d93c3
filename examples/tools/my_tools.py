"""Tools for `--tools examples/tools/my_tools.py:digit_sum examples/tools/my_tools.py:lookup`.

A tool is a typed function with a Google-style docstring (its schema comes from them, as in
TRL); what it returns (a string, or anything JSON can write) goes back to the model. A tool that
raises returns its error text to the model and counts in `tools/errors`. `async def` tools run
concurrently with the other calls of the turn; each call has `--tool-timeout` seconds.
"""

import asyncio

CAPITALS = {"france": "Paris", "japan": "Tokyo", "kenya": "Nairobi"}


def digit_sum(n: int) -> int:
    """Sum the decimal digits of an integer.

    Args:
        n: The integer, e.g. 1234.
    """
    return sum(int(d) for d in str(abs(n)))


async def lookup(country: str) -> str:
    """Look up the capital city of a country.

    Args:
        country: The country's English name.
    """
    await asyncio.sleep(0)  # a real tool would await a local index or a service here
    return CAPITALS[country.strip().lower()]  # an unknown country raises: the model sees the KeyError
