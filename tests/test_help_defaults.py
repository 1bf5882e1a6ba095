"""Every command's help shows its options' defaults; `u2moe export` needs no option."""
from __future__ import annotations

import argparse
import subprocess
import sys

from u2moe.__main__ import build_parser


def _commands(parser: argparse.ArgumentParser, name: str = "u2moe"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


def _option_help(parser: argparse.ArgumentParser, option: str) -> str:
    """The option's entry in the parser's help, whitespace removed (wrapping may split words)."""
    lines = parser.format_help().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{option} ")
                 or line.strip() == option or line.lstrip().startswith(f"{option},"))
    # The next entry starts at the options' indent; wrapped help lines are indented further.
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("  -")), len(lines))
    return "".join("".join(lines[start:end]).split())


def test_help_shows_every_default():
    checked = 0
    for name, parser in _commands(build_parser()):
        for action in parser._actions:
            default = action.default
            if (not action.option_strings or action.nargs == 0 or action.required or action.help == argparse.SUPPRESS
                    or default in (None, argparse.SUPPRESS, []) or "default" in (action.help or "").lower()):
                continue
            entry = _option_help(parser, action.option_strings[-1])
            assert f"default:{''.join(str(default).split())}" in entry, (name, action.option_strings, entry)
            checked += 1
    assert checked > 50  # decode's --beam, prep shards' --utts-per-shard, bench memory's --gpus, ...


def test_export_defaults_to_the_current_run_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "u2moe", "export"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    # Not argparse's "required" error: the default run directory is looked into.
    assert proc.returncode == 2 and "checkpoints: no complete checkpoint to export" in proc.stderr, proc.stderr
    entry = _option_help(dict(_commands(build_parser()))["u2moe export"], "--out")
    assert "(default:EXP_DIR/model.pt)" in entry
