"""The one error type for bad user input.

Raise `InputError` with one sentence that says what is wrong, where, and how to fix it.
The CLI turns it into that sentence on stderr and exit code 2; the service into a 4xx.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input from the user: a file, an argument or a bundle that cannot be used."""


def run_script(main: Callable[[], object]) -> None:
    """Run a script's entry point (the benchmarks'): bad input ends it with its sentence and exit code 2."""
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
