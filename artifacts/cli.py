"""The scripts' one way to end: a user's mistake is one ``error: ...`` line and exit status 2, never a traceback.

Every script ends with ``run_main(main)``. What a user can cause (a wrong flag value, a missing or foreign
input, an artifact that does not match, a run that holds the lock of ``--out``, a full disk) arrives here as
one of ``USER_ERRORS``; anything else is a defect and keeps its traceback. Set ``TTT_CONCEPTS_TRACEBACK=1`` to
see the traceback of a user error too.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

from artifacts.errors import ArtifactError

USER_ERRORS: tuple[type[BaseException], ...] = (ArtifactError, ValueError, OSError)
"""Exceptions a user's input or machine can cause. An ``OSError`` counts when it is one of ``USER_OS_ERRORS`` or
carries one of ``USER_ERRNOS``."""
USER_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC,
     errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP}
)
"""The ``OSError`` numbers that describe the user's files or disk (missing, forbidden, full), not a defect."""
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)
"""``OSError`` types that always describe the user's files, even when raised without an errno."""
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
TRACEBACK_ENV = "TTT_CONCEPTS_TRACEBACK"


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is a mistake of the user's (answered with one line) rather than a defect (a traceback)."""
    if isinstance(e, USER_OS_ERRORS):
        return True
    if isinstance(e, OSError):
        return e.errno in USER_ERRNOS
    return isinstance(e, USER_ERRORS)


def error_line(e: BaseException) -> str:
    """``error: MESSAGE`` on one line (the lines of a multi-line message are joined with ``; ``)."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    line = ""
    for part in (p.strip() for p in text.splitlines() if p.strip()):
        line += ("" if not line else " " if line.endswith(":") else "; ") + part
    return "error: " + line


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a script's ``main(argv)``: exit with its status when it returns a nonzero one, with 2 after one
    ``error:`` line for a user's mistake, with 130 when interrupted with Ctrl-C; return after a success."""
    try:
        status = main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        if not is_user_error(e) or os.environ.get(TRACEBACK_ENV):
            raise
        print(error_line(e), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if status:
        sys.exit(status)
