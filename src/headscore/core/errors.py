"""The one exception type the CLI turns into a single clear line on stderr."""


class HeadscoreError(Exception):
    """Bad input or an unusable resource. The message names the problem in one line."""
