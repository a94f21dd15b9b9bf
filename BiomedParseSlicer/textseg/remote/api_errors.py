"""The server's error answers: every error is ``{"error": code, "message": text, "status": n}``, never a traceback."""

from __future__ import annotations

from typing import Optional

from .backend import DISK_FULL

MAX_MESSAGE = 1000  # characters of an error message sent to a client (they never echo a whole request)
# textseg.errors classes raised while handling a request -> HTTP status (others: 400)
ERROR_STATUS = {"UsageError": 400, "InputError": 400, "WeightsError": 409, "ModelError": 500, "OutputExistsError": 409}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}



def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    return message if len(message) <= limit else message[: limit - 24] + " ... (message shortened)"


def error_response(status: int, code: str, message: str, headers: Optional[dict[str, str]] = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": code, "message": clip(message), "status": status}, status_code=status,
                        headers=headers)


def disk_full_error(what: str) -> ApiError:
    return ApiError(507, "disk_full", DISK_FULL.format(what=what))
