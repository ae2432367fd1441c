"""The one exception type for the user's mistakes and the machine's state.

A ``UserError`` is something the user can fix (bad params, a missing folder, a
busy output, a full disk): the CLI prints its message as one line and exits
with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

# where a stage command run by the pipeline writes its one-line error, for the flow to show it
# without a traceback (orchestration.py sets it for each stage; cli.py writes it)
ERROR_FILE_ENV = "MAE_OPS_ERROR_FILE"


class UserError(Exception):
    """A problem the user can fix; the message says what and how."""


class BusyError(UserError):
    """Another process is writing the same output right now."""


class DiskFullError(UserError, OSError):
    """A write ran out of disk space; the previous output is intact."""
