"""The FastAPI application."""
import gc
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi

from app import metrics
from app.limits import BodySizeLimitMiddleware
from app.problems import Problem, install_problem_handlers, problem_response
from app.routes import (
    base_models,
    checkpoints,
    datasets,
    evaluations,
    health,
    jobs,
    methods,
    task_vectors,
    ui,
)
from app.schemas import ProblemOut
from app.uploads import discard_uploads_in_flight
from engine.methods.catalogue import METHODS
from store.queries import BadCursor
from tvforge import logs

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

log = logging.getLogger(__name__)


class RequestIdMiddleware:
    """Every request gets an id (the client's X-Request-ID when it is a plain token): in the response's
    X-Request-ID and in every log line written while it is served. Pure ASGI, like LatencyMiddleware."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        # Not reset: uvicorn serves each request in a task of its own and writes the access line from it,
        # after this returns, so the id stays on that line too and goes with the task.
        logs.request_id.set(rid)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    import open_clip  # noqa: F401 (job estimates and model checks use it: imported here, not in a request)

    from engine.kernels import warm_up

    warm_up()  # uploads measure task vectors' top-k cuts with them: compiled (or loaded) once, here
    # What is loaded by now (torch, open_clip, numba, the app; about 550k objects) lives as long as the process:
    # frozen, out of the collector's sight, a full collection walks only what requests left behind. Before,
    # each one walked the whole heap for 130-260 ms, stalling every request in flight (100 pollers' p99:
    # 9-300 ms from run to run).
    gc.collect()
    gc.freeze()
    yield
    dropped = discard_uploads_in_flight()
    if dropped:
        log.info("shutdown: removed the partial files of %d uploads cut off", dropped)


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=lifespan,
        title="tvforge",
        version="1.0.0",
        summary="Compose task vectors of open_clip models: " + ", ".join(METHODS) + ".",
    )
    install_problem_handlers(app)

    @app.exception_handler(BadCursor)
    async def _bad_cursor(request: Request, _exc: BadCursor):
        return problem_response(Problem(422, "The cursor is not one this API gave out.", slug="bad-cursor"),
                                request)

    for module in (health, methods, base_models, task_vectors, datasets, jobs, evaluations, checkpoints, ui):
        app.include_router(module.router)
    app.mount("/ui/static", ui.static_files, name="ui-static")
    app.include_router(metrics.router)
    app.add_middleware(BodySizeLimitMiddleware)
    app.add_middleware(metrics.LatencyMiddleware)
    app.add_middleware(RequestIdMiddleware)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema["components"].setdefault("schemas", {})["Problem"] = ProblemOut.model_json_schema()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


app = create_app()
