"""The FastAPI application."""
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi

from app import metrics
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
from engine.methods.catalogue import METHODS
from store.queries import BadCursor


def create_app() -> FastAPI:
    app = FastAPI(
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
    app.middleware("http")(metrics.record_latency)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema["components"].setdefault("schemas", {})["Problem"] = ProblemOut.model_json_schema()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


app = create_app()
