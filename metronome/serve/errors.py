"""The error every endpoint answers with, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def shutting_down() -> ApiError:
    """The 503 of a generation or transcription the server ended because it is stopping
    (ServerState.stop_generating): not the request's failure; it may be sent again."""
    return ApiError(
        503,
        "the server is shutting down; send the request again (to another server, or once this one is back)",
        type="service_unavailable",
        code="server_shutting_down",
    )


def busy(message: str, retry_after_s: int) -> ApiError:
    """A 429 for a request that would fit later (a full queue, too many in progress): clients retry it."""
    return ApiError(
        429, message, type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after_s)}
    )
