"""ftkit: a small library behind readable fine-tuning recipes for encoder models."""

__version__ = "0.1.0"


class DataError(ValueError):
    """A problem the user can fix: bad input data, options, files or run directories. The message names
    the file and, where known, the line or row. Recipes and `ftkit` print it as one line; every other
    exception is a bug and keeps its traceback."""
