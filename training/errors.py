"""The one exception type the `hybrid-lm` command turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """A problem with what the user asked for: the message names the problem and the fix.

    The command line prints `error: <message>` and exits with `exit_code`, with no traceback unless
    `--debug` (or `HYBRID_LM_DEBUG=1`) is given.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
