"""Errors raised for bad input.

Every problem with a user's data or configuration is an :class:`InputError` whose message
starts with the offending file (or configuration key) followed by what is wrong, so that the
line Snakemake prints in the terminal is enough to fix it.
"""

from __future__ import annotations

from os import PathLike


class InputError(ValueError):
    """Bad input data or configuration.

    Parameters
    ----------
    where:
        The file, folder or configuration key at fault.
    problem:
        What is wrong with it, in words a user can act on.
    """

    def __init__(self, where: str | PathLike[str], problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")
