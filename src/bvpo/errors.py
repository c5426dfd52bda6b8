"""The one error family of bvpo: what it refuses or cannot do, said so a person can act on it.

Every module's error (ConfigError, DataError, ModelError, ...) is a `BvpoError`; the command
line prints the message and exits 2, with no traceback. Anything else is a bug.
"""


class BvpoError(Exception):
    """A refusal or failure with a message that names what is wrong and what was expected."""
