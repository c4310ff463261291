"""The project's errors: what a user can act on, and what may pass on a retry.

Everything the `fer` command should print as one line (bad input, a missing file, a param
typo, an unreachable server) derives from `FerError`; anything else is a bug and shows its
traceback. Retries (Prefect tasks) are decided on the type `TransientError`, never on text.
This module imports nothing from the project.
"""

from __future__ import annotations

# Exit status of `fer` for a TransientError: EX_TEMPFAIL ("try again later", sysexits.h), so a
# caller that only sees the process (DVC, a flow) can still tell it from a real failure.
EXIT_TRANSIENT = 75
EXIT_ERROR = 1
# When set, `fer` writes {"type", "transient", "message"} of a FerError to this file: how the
# runner learns the error's type across `dvc repro` (which hides the command's exit status).
ERROR_FILE_ENV = "FER_ERROR_FILE"


class FerError(Exception):
    """A problem the user can act on; the message says what and what to do next."""

    transient = False


class TransientError(FerError):
    """May pass on its own (tracking server down, a lock busy): worth retrying."""

    transient = True


class ParamsError(FerError):
    """params.yaml (or an override) has a missing, unknown or mistyped key."""


class MissingInputError(FerError):
    """An input a stage needs does not exist yet (run the stage that makes it)."""
