"""Placeholder: this command group is being written."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    pass
