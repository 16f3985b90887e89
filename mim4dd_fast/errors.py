"""User-facing errors: one clear sentence, exit code 2 from the CLI, never a traceback."""


class UserError(Exception):
    """Bad input from the user (path, file, config, flag, hyperparameter).

    The message is a single sentence that says what is wrong and how to fix it. The CLI prints it
    and exits with code 2.
    """


class DataError(UserError):
    """A dataset could not be read: missing directory, truncated or malformed file, empty class."""


class ConfigError(UserError):
    """A setting is invalid: unknown key, wrong type, out-of-range or non-finite value."""


class NonFiniteError(UserError):
    """Distillation produced NaN/Inf; the message names the setting to lower."""
