"""The one exception type users see.

Bad input (a config, a data file, a checkpoint, a CLI argument) raises `SpindleError` with a
message that names the file / key / line and what was expected. Entry points print the message
and exit with code 2; a traceback is shown only with `--debug`.
"""


class SpindleError(Exception):
    """A user-facing error: the message is the whole story, no traceback needed."""

    exit_code = 2
