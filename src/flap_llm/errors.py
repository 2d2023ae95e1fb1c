"""The one exception type the library raises for bad input."""


class FlapError(ValueError):
    """Raised for invalid configuration, model or data; the message says what to do instead."""
