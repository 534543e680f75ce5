"""Errors a user can fix. The CLI prints them as one line (exit 2); the service maps them to a 400."""


class UserError(Exception):
    """Bad input from a user: the message names what was wrong and where (file, line, field, key)."""


class ConfigError(UserError):
    """A config file or flag is unknown, mistyped or out of range."""


class CheckpointError(UserError):
    """A checkpoint directory is missing, truncated, mismatched or unsafe to load."""
