"""The one exception type that reaches users as a one-line message (no traceback)."""


class UserError(Exception):
    """Bad input or environment, reported as ``error: <message>`` with a non-zero exit.

    The message must be one line and name the offending file or value.  The CLI prints the
    traceback only with ``--debug``.
    """

    exit_code = 2
