"""The one exception type the CLI turns into a clear one-line error and a non-zero exit."""


class VitqError(Exception):
    """A user-facing error: bad input, unusable data, mismatched recipe."""
