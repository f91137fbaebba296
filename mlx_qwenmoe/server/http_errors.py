"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from typing import Any, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """A request the server refuses; becomes the JSON error body and ``status``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.body = {"message": message, "type": type, "param": param, "code": code}

    def to_dict(self) -> Dict[str, Any]:
        return {"error": self.body}

    def response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status, headers=self.headers)


# Pydantic names the member of a Union it tried in the error's location ("str", "list[int]",
# "TextPart"); OpenAI's ``param`` is the field path alone.
_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_field(part: str) -> bool:
    return part != "body" and "[" not in part and not part[:1].isupper() and part not in _TYPE_NAMES


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if _is_field(str(p))]
    if first.get("type") == "json_invalid":
        return APIError(f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = ".".join(loc) or None
    where = f"'{param}'" if param else "the request body"
    got = first.get("input")
    got_text = "" if first.get("type") == "missing" else f" (got {got!r:.80})"
    return APIError(f"{where}: {first.get('msg')}{got_text}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal, including FastAPI's own validation and routing errors, in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(Exception)
    async def _failed(_: Request, exc: Exception) -> JSONResponse:
        return APIError(f"generation failed: {exc}", status=500, type="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(str(exc.detail), status=exc.status_code, type=kind).response()
