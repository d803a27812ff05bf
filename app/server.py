"""uvicorn, hardened against slow clients: a deadline for a request's headers (uvicorn has none, so a client
trickling header bytes held a connection forever) and a bound on their size, an idle timeout while a request
body arrives (an ASGI middleware: a stalled upload gets 408 and its partial file is dropped like any interrupted
upload), a cap on open connections (503 beyond it), keep-alive and graceful-shutdown timeouts. `tvforge api`
and the Docker image both start the API through serve()."""
import asyncio
import json

from starlette.exceptions import HTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tvforge.logs import configure_logging
from tvforge.settings import Settings

MAX_HEADER_BYTES = 64 * 1024  # a request line and headers together; nginx's default allows 4 x 8 KiB
HEADERS_TOO_LARGE = json.dumps({
    "type": "/problems/headers-too-large", "title": "Request Header Fields Too Large", "status": 431,
    "detail": f"The request line and headers are over {MAX_HEADER_BYTES} bytes."}).encode()


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """Closes a connection whose request headers are not complete within header_timeout_s of their first
    byte (or of the connection opening): the slowloris defence uvicorn leaves out. Also answers 431 and closes
    once a request line and headers pass MAX_HEADER_BYTES: uvicorn sets no bound, and httptools grows a header
    value by concatenation (a 100 MiB header held the event loop for seconds and 190 MB of memory)."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes: int | None = 0  # bytes of the request's head so far; None once it is complete
        self._head_began_in_read = False
        self._refused_head = False  # past the bound while earlier pipelined requests were still being answered
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._refused_head:
            return  # its 431 goes once the earlier responses are out; nothing more is parsed
        self._head_began_in_read = False
        super().data_received(data)
        if self._header_bytes is None or self.transport.is_closing():
            return
        # Counted after parsing, while a head is still incomplete: a read the head ran through from its start
        # counts whole; the read a head began in is not counted (it may hold an earlier request's body), so a head
        # is bounded at this plus one read (asyncio reads up to 256 KiB).
        if not self._head_began_in_read:
            self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._cancel_header_deadline()
            if self._answering():
                self._refused_head = True  # answered in order: after the responses before it
                self.flow.pause_reading()
            else:
                self._refuse_head()

    def _refuse_head(self) -> None:
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: application/problem+json\r\n"
                             b"content-length: " + str(len(HEADERS_TOO_LARGE)).encode() + b"\r\n"
                             b"connection: close\r\n\r\n" + HEADERS_TOO_LARGE)
        self.transport.close()

    def _answering(self) -> bool:
        """Whether an earlier request's response is still being made (uvicorn reads no more meanwhile)."""
        return self.cycle is not None and not self.cycle.response_complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._answering() or self.transport.is_closing():
            return
        if self._refused_head:
            self._refuse_head()
        elif self._header_bytes is not None and self._header_deadline is None:  # a pipelined head still coming
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes, self._head_began_in_read = 0, True
        # The next request on a kept-alive connection; a pipelined one behind a response in progress is timed from
        # that response's end, since uvicorn stops reading until then (on_response_complete).
        if self._header_deadline is None and not self._answering():
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def on_headers_complete(self) -> None:
        self._header_bytes = None
        self._cancel_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %s s", self.header_timeout_s)
            self.transport.close()


class BodyIdleTimeout(HTTPException):
    """Raised from receive(): the app's problem handlers answer it as a 408 problem, and the upload that was
    reading the body cleans up as for any interrupted upload."""

    def __init__(self, idle_s: float):
        super().__init__(408, f"No request body arrived for {idle_s:g} s.", headers={"Connection": "close"})


class BodyIdleTimeoutMiddleware:
    """A request body that stops arriving for idle_s seconds ends the request with a 408 problem. Only reads
    of the body are timed: once it is complete, receive() waits for a disconnect as long as it must
    (streamed responses listen that way)."""

    def __init__(self, app, idle_s: float):
        self.app, self.idle_s = app, idle_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_complete = False

        async def timed_receive():
            nonlocal body_complete
            if body_complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_s)
            except TimeoutError:
                raise BodyIdleTimeout(self.idle_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_complete = True
            return message

        await self.app(scope, timed_receive, send)


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    from app.main import app

    configure_logging(settings.log_format)
    HeaderDeadlineProtocol.header_timeout_s = settings.header_timeout_s
    uvicorn.run(BodyIdleTimeoutMiddleware(app, settings.body_idle_timeout_s), log_config=None,
                host=host or settings.api_host,
                port=port or settings.api_port, proxy_headers=True, log_level="info", http=HeaderDeadlineProtocol,
                timeout_keep_alive=settings.keep_alive_timeout_s, limit_concurrency=settings.max_connections,
                timeout_graceful_shutdown=settings.graceful_shutdown_s)
