"""What can go wrong with a generation or a session, each said once and without HTTP.

The generation and session code raise `Problem`; the HTTP layer (service/errors.py) gives each
``code`` its status and OpenAI's error envelope, and the client sees the code as ``error.code``.
"""

from __future__ import annotations


class Problem(Exception):
    def __init__(self, code: str, message: str, param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param  # the request field at fault, if one is
        self.retry_after_s = retry_after_s  # when a retry may succeed, if it may


def session_not_found(session_id: str, param: str = "session_id") -> Problem:
    return Problem("session_not_found", f"{param}: session {session_id!r} does not exist or has expired", param)


def session_busy(session_id: str, param: str = "session_id") -> Problem:
    return Problem(
        "session_busy", f"{param}: session {session_id!r} is in use by another request; retry when it ends", param
    )


def store_unavailable(err: Exception) -> Problem:
    message = f"the session store is unavailable: {err}; requests without a session still work"
    return Problem("store_unavailable", message, retry_after_s=1)


def unknown_characters(param: str, unknown: list[str]) -> Problem:
    """Characters outside the model's vocabulary in the field ``param`` (the first 20 shown)."""
    shown = ", ".join(repr(ch) for ch in unknown[:20]) + (", ..." if len(unknown) > 20 else "")
    return Problem("unknown_characters", f"{param}: characters the model does not know: {shown}", param)


def interrupted(reason: str) -> Problem:
    """A generation that ended before its end (stopped at shutdown, or its client's lease lost)."""
    return Problem("interrupted", f"generation was interrupted ({reason})")
