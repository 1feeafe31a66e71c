"""User-facing errors.

Anything raised as :class:`MedsslError` is a problem with the user's input (files, arguments, configs) rather than a
bug: the ``medssl`` command prints its message without a traceback and exits with status 2. Messages say what is
wrong, where, and what to do; they never contain patient identifiers.
"""


class MedsslError(Exception):
    """A problem with the user's input, reported without a traceback by the ``medssl`` command."""


class DataError(MedsslError, ValueError):
    """Input data that is missing, unreadable or of an unexpected shape or type."""


class ConfigError(MedsslError, KeyError):
    """A bundle config or command-line override that is unknown or inconsistent."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class CheckpointError(MedsslError, RuntimeError):
    """A checkpoint that does not match the network it is loaded into."""
