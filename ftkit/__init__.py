"""ftkit: a small library behind readable fine-tuning recipes for encoder models."""

__version__ = "0.1.0"


class DataError(ValueError):
    """Bad input a user can fix. The message names the file and, where known, the line or row."""
