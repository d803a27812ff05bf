"""RFC 9457 problem details for every error the API answers."""
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError as SqlOperationalError
from sqlalchemy.exc import TimeoutError as SqlPoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.schemas import JOB_BODIES
from engine.methods.catalogue import METHODS
from engine.methods.spec import valid_fields_at

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem+json body."""

    def __init__(self, status: int, detail: str, *, title: str | None = None, slug: str | None = None,
                 errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.type = f"/problems/{slug}" if slug else "about:blank"
        self.errors = errors
        self.headers = headers

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return body


def not_found(kind: str, resource_id: str) -> Problem:
    return Problem(404, f"No {kind} with id {resource_id!r}.", slug="not-found")


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    return JSONResponse(
        problem.body(request.url.path if request else None),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


UNION_TAG_ERRORS = ("union_tag_invalid", "union_tag_not_found")


def _error(err: dict, job_body: bool) -> dict[str, Any]:
    """A validation error as the problem lists it. In a job's body pydantic puts the method (the union's tag) in
    the path, which is not a field, and an unknown field's message names the valid ones."""
    loc, msg = [str(part) for part in err["loc"]], err.get("msg", "")
    if not job_body:
        return {"loc": loc, "msg": msg, "type": err.get("type", "")}
    method = loc.pop(1) if len(loc) > 1 and loc[0] == "body" and loc[1] in METHODS else None
    if err.get("type") in UNION_TAG_ERRORS:
        loc.append("method")
    if err.get("type") == "extra_forbidden" and method is not None:
        valid = valid_fields_at(JOB_BODIES[method], loc[1:-1])
        if valid is not None:
            msg = f"Unknown field {loc[-1]!r}; valid fields: {', '.join(valid)}"
    return {"loc": loc, "msg": msg, "type": err.get("type", "")}


def _validation_errors(exc: RequestValidationError, request: Request) -> list[dict[str, Any]]:
    job_body = request.method == "POST" and request.url.path.rstrip("/") == "/v1/jobs"
    return [_error(err, job_body) for err in exc.errors()]


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
        slug = "too-large" if exc.status_code == 413 else None  # app.limits: the same type as an upload's 413
        return problem_response(Problem(exc.status_code, detail, slug=slug, headers=exc.headers), request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = Problem(422, "The request is not valid; see errors.", slug="validation",
                          errors=_validation_errors(exc, request))
        return problem_response(problem, request)

    @app.exception_handler(SqlPoolTimeout)
    async def _pool_exhausted(request: Request, exc: SqlPoolTimeout) -> JSONResponse:
        return problem_response(Problem(503, "The service is at capacity; retry shortly.", slug="busy",
                                        headers={"Retry-After": "1"}), request)

    @app.exception_handler(SqlOperationalError)
    async def _database_unavailable(request: Request, exc: SqlOperationalError) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.orig)
        return problem_response(Problem(503, "The database is unavailable; retry shortly.", slug="unavailable",
                                        headers={"Retry-After": "2"}), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(Problem(500, "An unexpected error occurred; it has been logged."), request)


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": HTTPStatus(status).phrase,
             "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    for status in (400, 401, 404, 408, 409, 413, 415, 422, 429)
}
