"""Help texts that show each option's default, for every `u2moe` command and subcommand."""
from __future__ import annotations

import argparse
import copy
from typing import Any


def _has_default_to_show(action: argparse.Action) -> bool:
    # Flags (no value) and options without a default (None, empty lists) have nothing to show;
    # required options and positionals are always given; a help text that speaks of its default
    # already says it in its own words.
    return (bool(action.option_strings) and action.nargs != 0 and not action.required
            and action.help is not argparse.SUPPRESS and action.default not in (None, argparse.SUPPRESS)
            and action.default != [] and "default" not in (action.help or "").lower())


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends an option's help with its default: also for options without help text, which
    argparse's ArgumentDefaultsHelpFormatter leaves out."""

    def add_argument(self, action: argparse.Action) -> None:
        if _has_default_to_show(action):
            action = copy.copy(action)  # the parser's own action stays as it is
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
        super().add_argument(action)


class HelpParser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; its subcommands' parsers are of this class too
    (argparse makes subparsers of their parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
