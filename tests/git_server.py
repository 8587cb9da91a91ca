"""A git server over HTTPS on a free loopback port, as GitHub or GitLab serve
repositories: git's own `git http-backend` behind a small HTTP server that
asks for a token in the Authorization header, records every request (path and
header) and can answer with a redirect instead."""

from __future__ import annotations

import base64
import http.server
import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class GitServerState:
    """What the server serves and what it saw."""

    project_root: str
    token: str | None = None
    redirect_to: str | None = None
    # while set and not yet released, a fetch's pack stalls (a slow uplink)
    stall: threading.Event | None = None
    seen: list[tuple[str, str | None]] = field(default_factory=list)

    def expected_authorization(self, user: str) -> str | None:
        if self.token is None:
            return None
        return "Basic " + base64.b64encode(f"{user}:{self.token}".encode()).decode()


def _handler(state: GitServerState, user: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _serve(self) -> None:
            authorization = self.headers.get("Authorization")
            state.seen.append((self.path, authorization))
            if state.redirect_to is not None:
                self.send_response(301)
                self.send_header("Location", state.redirect_to + self.path)
                self.end_headers()
                return
            expected = state.expected_authorization(user)
            if expected is not None and authorization != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.end_headers()
                return
            path, _, query = self.path.partition("?")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if state.stall is not None and self.command == "POST":
                state.stall.wait(60)  # bounded: the test releases it, or it ends by itself
            environment = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": state.project_root,
                "GIT_HTTP_EXPORT_ALL": "1",
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "REQUEST_METHOD": self.command,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_ADDR": "127.0.0.1",
            }
            if self.headers.get("Content-Encoding"):
                environment["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
            if self.headers.get("Git-Protocol"):
                environment["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
            result = subprocess.run(
                ["git", "http-backend"],
                input=body,
                env=environment,
                capture_output=True,
                timeout=60,
                check=False,
            )
            head, _, payload = result.stdout.partition(b"\r\n\r\n")
            status = 200
            headers: list[tuple[str, str]] = []
            for line in head.decode("latin-1").split("\r\n"):
                if not line:
                    continue
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.strip().split()[0])
                else:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def git_https_server(
    state: GitServerState, certificate: str, key: str, user: str = "oauth2"
) -> Iterator[int]:
    """Serve `state.project_root` over HTTPS on 127.0.0.1; yield the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, user))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
