"""Errors a user can act on, and the entry point that prints them as one line instead of a traceback.

Every stage and tool raises a UserError subclass (bad data, a checkpoint that cannot be resumed this way, data not
prepared for a launch) with a message that names the file, the line where there is one, what is wrong and what to
do. `run_main` prints it as `error: ...` and exits with status 2, as it does a save that ran out of disk space
(utils/disk.py); MINI_QWEN_DEBUG=1 (or --debug) shows the traceback as well.
"""

import os
import sys


class UserError(Exception):
    """A problem with the input or the request, not with the code: its message is all the user needs."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the command was pointed at is not there."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work (a flag's value, a model shape, a combination of options)."""


def run_main(main, argv: list[str]) -> None:
    debug = "--debug" in argv or os.environ.get("MINI_QWEN_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        main(argv)
    except Exception as err:
        if debug:
            raise
        if isinstance(err, UserError):
            message = str(err)
        else:
            from utils.disk import full_disk_message  # a full disk is the user's to fix too (utils/disk.py)

            message = full_disk_message(err, argv, main)
            if message is None:
                raise
        if int(os.environ.get("RANK", "0")) == 0:  # one message per launch, not one per rank
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
