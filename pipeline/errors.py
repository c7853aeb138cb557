"""The one base of every error the project raises on purpose.

A `MixerError`'s message names what is wrong (the key, file, step or shard) and what to do about it; `mixer`
prints it as `error: ...` and exits with status 2. Anything else that escapes is a bug and keeps its traceback.
"""


class MixerError(Exception):
    """An error raised on purpose, with a message meant for the user."""
