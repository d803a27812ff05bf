"""The request body limit of every route but the uploads (which app.uploads bounds as it streams them)."""
from starlette.exceptions import HTTPException

# JSON bodies (jobs, evaluations) are read whole before the route or its key check runs. The largest a client
# needs, a job over a thousand task vectors, is tens of KiB.
MAX_JSON_BODY_BYTES = 1024 * 1024


class BodyTooLarge(HTTPException):
    """Raised from receive(): FastAPI passes an HTTPException from its body read on to the problem handlers."""

    def __init__(self):
        super().__init__(413, f"The request body is over {MAX_JSON_BODY_BYTES} bytes; uploads go as "
                              "multipart/form-data.", headers={"Connection": "close"})


# The routes that stream a multipart upload to disk (app.uploads), under the settings' max_upload_bytes.
UPLOAD_ROUTES = frozenset({("POST", "/v1/base-models"), ("POST", "/v1/task-vectors"), ("POST", "/v1/datasets")})


class BodySizeLimitMiddleware:
    """Bounds every request body but the uploads': a declared Content-Length over MAX_JSON_BODY_BYTES is refused
    at the first read, a chunked body as soon as it passes the limit. The uploads are known by their route, not by
    a Content-Type the client chooses. Not FastAPI's max_body_size: for an announced oversize body whose route
    answers before reading it (a missing key), Starlette replaces that answer with a plain-text 413, not a
    problem."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"], scope["path"].rstrip("/")) in UPLOAD_ROUTES:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        received = int(declared) if declared.isdigit() else 0

        async def bounded_receive():
            nonlocal received
            if received > MAX_JSON_BODY_BYTES:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request" and not declared.isdigit():
                received += len(message.get("body", b""))
                if received > MAX_JSON_BODY_BYTES:
                    raise BodyTooLarge()
            return message

        await self.app(scope, bounded_receive, send)
