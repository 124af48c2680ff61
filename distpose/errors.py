"""User-facing errors: the CLI prints these as one line and exits with their code, no traceback."""


class UserError(Exception):
    """A mistake in what the user asked for (arguments, config). Exit code 2."""

    exit_code = 2


class DataError(UserError):
    """Input data that cannot be used: missing, malformed or corrupt files. Exit code 1."""

    exit_code = 1
