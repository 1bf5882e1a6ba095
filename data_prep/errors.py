"""The one exception type that data preparation raises for bad user input.

Messages always name the file (and line or key) at fault, so the CLI can print them as they are
instead of a traceback.
"""
from __future__ import annotations


class DataPrepError(Exception):
    """Invalid input or configuration; the message names the file, line or key."""
