"""User-facing errors: the CLI prints these as one line and exits with their code, no traceback.

Exit 2: what was asked for is wrong (an argument, a config key or value, a path that does not exist).
Exit 1: data that exists but cannot be used (malformed, corrupt, incomplete), or a run that failed.
Exit 130: interrupted (Ctrl-C)."""


class UserError(Exception):
    """A mistake in what the user asked for (arguments, config). Exit code 2."""

    exit_code = 2


class DataError(UserError):
    """Input data that cannot be used: missing, malformed or corrupt files. Exit code 1."""

    exit_code = 1
