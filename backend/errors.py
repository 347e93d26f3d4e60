"""The one error type for bad user input.

Raise `InputError` with one sentence that says what is wrong, where, and how to fix it.
The CLI turns it into that sentence on stderr and exit code 2; the service into a 4xx.
"""


class InputError(ValueError):
    """Bad input from the user: a file, an argument or a bundle that cannot be used."""
