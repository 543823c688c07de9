"""The one exception type users see: a one-line message naming the file/field and what was expected."""


class MedmergeError(ValueError):
    """Bad input or an impossible request. The message is one line, fit to print as it is."""
