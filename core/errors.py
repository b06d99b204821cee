"""The one exception type qtool raises for problems a user can act on."""

BAD_INPUT = 2
FAILURE = 1


class QtoolError(Exception):
    """A problem with a one-line message saying what was wrong and what to do.

    The CLI prints the message without a traceback and exits with `exit_code`:
    2 for bad input (a missing file, an impossible option), 1 for a failure while working.
    """

    def __init__(self, message: str, exit_code: int = BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code
