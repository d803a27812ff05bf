"""A real TCP proxy in front of the API that loses or cuts answers on purpose, as a flaky network does."""
import socket
import threading
from collections.abc import Callable

# decide(request head) -> None (pass everything), the number of answer bytes to forward before cutting
# the client's connection (0: the server did the work, the client never hears of it), or bytes: an answer of
# the proxy's own (a gateway's 502, say), the request never forwarded.
Decide = Callable[[bytes], int | bytes | None]


class FlakyProxy:
    def __init__(self, upstream_port: int, decide: Decide):
        self.upstream_port, self.decide = upstream_port, decide
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                upstream.close()
                return
            head += chunk
        limit = self.decide(head)
        if isinstance(limit, bytes):
            client.sendall(limit)
            self.cuts += 1
            for sock in (client, upstream):
                sock.close()
            return
        upstream.sendall(head)
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        forwarded = 0
        try:
            while chunk := upstream.recv(65536):
                if limit is not None and forwarded + len(chunk) > limit:
                    client.sendall(chunk[:limit - forwarded])
                    self.cuts += 1
                    break
                client.sendall(chunk)
                forwarded += len(chunk)
        except OSError:
            pass
        finally:
            # shutdown, not just close: it wakes the pump blocked in recv() and sends the client its FIN now.
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
