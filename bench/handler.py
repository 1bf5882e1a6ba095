"""The command handler of a benchmark whose bad input is one logged line, not a traceback."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable


def logged_run(run: Callable[[argparse.Namespace], object], logger: logging.Logger,
               errors: tuple[type[BaseException], ...]) -> Callable[[argparse.Namespace], int]:
    """A handler that logs at INFO, runs `run(args)`, and ends with exit code 2 and the error's
    line for any of `errors`."""
    def handler(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        try:
            run(args)
        except errors as err:
            logger.error("%s", err)
            return 2
        return 0

    return handler
