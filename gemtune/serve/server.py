"""Running the app: uvicorn with a header timeout (slowloris), in the foreground (`gemtune serve`) or in a background
thread (`ServerThread`: tests, benchmarks, notebooks, the demo)."""

from __future__ import annotations

import json
import logging
import threading
import time

from fastapi import FastAPI

from gemtune.serve.openai import error_body

log = logging.getLogger("gemtune.serve")
HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this (else the connection is closed)


def header_timeout_protocol(seconds: float):
    """uvicorn's HTTP protocol with a header timeout, which uvicorn lacks (its `timeout_keep_alive` stops counting
    at the first byte): a connection whose request headers are not complete `seconds` after the request's first
    byte (or after the connection opened) is closed. Without it, a client that sends half a request line and then
    nothing holds a connection, before any authentication, for ever (slowloris). Bodies have their own limit in
    the app (`create_app(body_timeout_s=...)`). Requests the HTTP parser refuses are answered in OpenAI's error
    shape rather than uvicorn's plain text."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeoutProtocol(AutoHTTPProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._hdr_timer = None
            self._arm()

        def _arm(self) -> None:
            self._hdr_cycle = self.cycle  # a new cycle appears when the next request's headers are complete
            self._hdr_timer = self.loop.call_later(seconds, self._header_timeout)

        def _disarm(self) -> None:
            if self._hdr_timer is not None:
                self._hdr_timer.cancel()
                self._hdr_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._hdr_timer is not None:
                if self.cycle is not self._hdr_cycle:
                    self._disarm()
            elif (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self._arm()  # the first bytes of a next request on a kept-alive connection

        def send_400_response(self, msg: str) -> None:
            """A request the HTTP parser refuses (headers over 16 KiB, bad syntax) in OpenAI's shape too."""
            body = json.dumps(error_body(f"invalid HTTP request: {msg}", "invalid_request_error", None,
                                         400)).encode()
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
                                 + body)
            self.transport.close()

        def _header_timeout(self) -> None:
            self._hdr_timer = None
            if self.cycle is self._hdr_cycle and not self.transport.is_closing():
                log.info("closing a connection whose request headers did not arrive within %g s", seconds)
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_config(app, *, host: str, port: int, log_level: str = "warning",
                   header_timeout_s: float = HEADER_TIMEOUT_S, **kw):
    """The uvicorn settings `gemtune serve` and `ServerThread` share. Keep-alive is longer than clients' pools
    (httpx: 5 s) so a reused idle connection is never closed under them."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, backlog=2048, timeout_keep_alive=30,
                          http=header_timeout_protocol(header_timeout_s), **kw)


class ServerThread:
    """uvicorn in a background thread (tests, benchmarks, notebooks): `with ServerThread(app, port=0) as s:`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", *,
                 header_timeout_s: float = HEADER_TIMEOUT_S):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level,
                                                    header_timeout_s=header_timeout_s, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="gemtune-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server failed to start (see log above)")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start in time")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
