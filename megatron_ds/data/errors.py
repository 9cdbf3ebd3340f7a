"""The one error type of the data path.

A ValueError subclass so callers that only know the standard library still catch it; the message is
always one line that names the file or flag and says what to do.
"""


class DataError(ValueError):
    """A corpus, index or tokenizer file is missing, unreadable or inconsistent."""
