"""The one exception type the CLI turns into a single clear error line (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed record, an invalid option.

    The command line prints ``error: <message>`` and exits with code 2, without a traceback
    unless ``--debug`` is given. Library code raises it (or ValueError/TypeError) with a
    message that names the offending field, file or line.
    """
