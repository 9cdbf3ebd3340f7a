"""Errors that speak to the user: each message names the flag or file and what to do."""


class ConfigError(ValueError):
    """Bad configuration; the message names the flag and what to do."""
