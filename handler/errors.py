"""Typed request errors: the only exceptions that a bad request may raise.

Each carries an HTTP status and a bounded ``reason`` used as a metric label, so the adapter can
answer ``{code, type, message}`` with a 4xx and count the failure without a free-form label.
"""
from __future__ import annotations

# Every value of the ``reason`` label on mrl_request_errors_total. Bounded on purpose.
ERROR_REASONS = ("empty", "decode", "too_large", "bad_option", "bad_request", "internal")


class InputError(ValueError):
    """The request's fault: answered with a 4xx and a JSON message naming what was wrong."""

    def __init__(self, message: str, *, reason: str = "bad_request", status: int = 400) -> None:
        if reason not in ERROR_REASONS:
            raise ValueError(f"reason must be one of {ERROR_REASONS}, got {reason!r}")
        if not 400 <= status < 500:
            raise ValueError(f"an InputError must carry a 4xx status, got {status}")
        super().__init__(message)
        self.reason, self.status = reason, status

    @property
    def error_type(self) -> str:
        return {"empty": "EmptyInput", "decode": "UndecodableImage", "too_large": "ImageTooLarge",
                "bad_option": "InvalidOption"}.get(self.reason, "BadRequest")

    def to_json(self) -> dict:
        return {"code": self.status, "type": self.error_type, "message": str(self)}
