"""The `mixer` command groups; each module registers its subcommands with `register(subparsers)`."""

import sys


def fail(message: object) -> int:
    """Report a user error on stderr and return the exit code for it."""
    print(f"error: {message}", file=sys.stderr)
    return 2
