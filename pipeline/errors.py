"""The one base of every error the project raises on purpose.

A `MixerError`'s message names what is wrong (the key, file, step or shard) and what to do about it; `mixer`
prints it as `error: ...` and exits with status 2. Anything else that escapes is a bug and keeps its traceback.
"""


class MixerError(Exception):
    """An error raised on purpose, with a message meant for the user."""


class FinalError(MixerError):
    """Raised by every rank at once for what a restart from the newest checkpoint would meet again: the loss
    diverged, too many samples were skipped. The workers end without Ray Train's retries (each would replay the
    steps since that checkpoint to fail the same way) and the driver raises the error with its whole message."""
