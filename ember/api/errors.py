"""Errors in OpenAI's JSON shape: {"object": "error", "error": {"message", "type", "param", "code"}, ...}.

The `error` key is what the openai SDK reads, so it raises BadRequestError etc. with our message.
The Anthropic-style routes (/v1/messages) answer in Anthropic's shape instead (`anthropic_error_body`).
"""
from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    409: "ConflictError",
    413: "RequestTooLarge",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raise anywhere in a route to answer with an OpenAI-shaped error."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, err_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.err_type = err_type


def error_body(message: str, status: int = 400, param: str | None = None, err_type: str | None = None) -> dict:
    etype = err_type or _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
    return {
        "object": "error",
        "error": {"message": message, "type": etype, "param": param, "code": status},
        # SGLang's flat fields, for clients written against it
        "message": message,
        "type": etype,
        "param": param,
        "code": status,
    }


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(message: str, status: int = 400) -> dict:
    """Anthropic's error shape: {"type": "error", "error": {"type": "invalid_request_error", "message"}}."""
    etype = _ANTHROPIC_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": etype, "message": message}}


def error_response(message: str, status: int = 400, param: str | None = None,
                   err_type: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, err_type), status_code=status, headers=headers)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message from pydantic errors, and the first offending field."""
    parts = []
    param = None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        # drop pydantic's union-branch names (e.g. 'str', 'list[int]') from the path
        loc = [x for x in loc if not (x.startswith(("list[", "dict[")) or x in ("str", "int", "float", "bool",
                                                                                    "function-after",
                                                                                    "function-before"))]
        field = ".".join(loc) or "body"
        if param is None:
            param = field
        msg = err.get("msg", "invalid value")
        if "input" in err and err.get("type") not in ("missing",):
            shown = repr(err["input"])
            if len(shown) > 60:
                shown = shown[:57] + "..."
            parts.append(f"{field}: {msg} (got {shown})")
        else:
            parts.append(f"{field}: {msg}")
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return "Invalid request: " + "; ".join(parts), param
