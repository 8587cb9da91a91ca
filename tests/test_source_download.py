"""Fetching a version's source: from a real git repository made here, and as a
GitLab tarball from a local HTTPS server that checks the token header;
unsafe archives are refused and nothing is left half-written."""

from __future__ import annotations

import http.server
import io
import os
import ssl
import tarfile
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from benchmarks.production import git
from src import constants
from src.types import UpdaterConfig
from src.utils.update.source import (
    DownloadError,
    download_source_code,
    remove_stale_staging,
)
from tests.mqtt_helpers import make_certificates

pytestmark = [pytest.mark.updater, pytest.mark.integration]

TOKEN = "glpat-secret-token-123"


@pytest.fixture
def root(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    directory = str(tmp_path / "ivy-root")
    monkeypatch.setattr(constants, "ROOT_DIR", directory)
    return directory


def make_repository(directory: str, versions: dict[str, str]) -> str:
    """A git repository with one commit and tag per version; the value is the
    version its pyproject.toml claims."""
    os.makedirs(directory)
    git("init", "--quiet", cwd=directory)
    for tag, claimed in versions.items():
        with open(os.path.join(directory, "pyproject.toml"), "w") as f:
            f.write(f'[project]\nname = "ivy"\nversion = "{claimed}"\n')
        git("add", "-A", cwd=directory)
        git("commit", "--quiet", "-m", tag, cwd=directory)
        git("tag", f"v{tag}", cwd=directory)
    return directory


def test_git_source_checks_out_the_tag_into_the_version_directory(tmp_path: Any, root: str) -> None:
    repository = make_repository(str(tmp_path / "repo"), {"1.0.0": "1.0.0", "1.1.0": "1.0.9"})
    config = UpdaterConfig(source="git", repository=repository)
    progress: list[str] = []
    target = download_source_code(config, "1.0.0", progress.append)
    assert target == os.path.join(root, "1.0.0")
    assert 'version = "1.0.0"' in open(os.path.join(target, "pyproject.toml")).read()
    assert not os.path.exists(os.path.join(target, ".git"))
    assert download_source_code(config, "1.0.0", progress.append) == target  # kept

    with pytest.raises(DownloadError, match="git clone failed"):
        download_source_code(config, "2.0.0", progress.append)  # no such tag
    with pytest.raises(DownloadError, match=r"says it is version 1\.0\.9"):
        download_source_code(config, "1.1.0", progress.append)
    assert sorted(os.listdir(root)) == ["1.0.0"]  # no half-written version, no staging

    sneaky = UpdaterConfig(source="git", repository=f"--upload-pack=touch${{IFS}}{tmp_path}/pwned")
    with pytest.raises(DownloadError):
        download_source_code(sneaky, "1.0.0-rc.1", progress.append)
    assert not os.path.exists(tmp_path / "pwned")  # a repository is never an option


def test_a_crash_leaves_staging_that_the_next_start_removes(root: str) -> None:
    os.makedirs(os.path.join(root, ".staging-1.2.3-abc", "source"))
    os.makedirs(os.path.join(root, "1.0.0"))
    assert remove_stale_staging() == [".staging-1.2.3-abc"]
    assert os.listdir(root) == ["1.0.0"]


def tarball(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


class Archives(http.server.BaseHTTPRequestHandler):
    """A GitLab stand-in: archives by tag, only with the right token header;
    while `stall` is set, an answer stops after its first bytes."""

    archives: ClassVar[dict[str, bytes]] = {}
    seen_paths: ClassVar[list[str]] = []
    stall: ClassVar[threading.Event | None] = None

    def do_GET(self) -> None:
        self.seen_paths.append(self.path)
        if self.headers.get("PRIVATE-TOKEN") != TOKEN:
            self.send_response(401, "Unauthorized")
            self.end_headers()
            return
        tag = self.path.rsplit("sha=", 1)[-1]
        body = self.archives.get(tag)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        stall = self.stall
        if stall is not None and body:
            self.wfile.write(body[:100])
            self.wfile.flush()
            stall.wait(60)  # bounded: the test releases it, or it ends by itself
            return
        self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    certificates = make_certificates(str(tmp_path / "certs"))
    monkeypatch.setenv("SSL_CERT_FILE", certificates["ca"])  # the client trusts the test CA
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Archives)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates["cert"], certificates["key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def gitlab(port: int, token: str | None = TOKEN) -> UpdaterConfig:
    return UpdaterConfig.model_validate(
        {
            "source": "gitlab",
            "repository": "group/ivy",
            "host": f"localhost:{port}",
            "access_token": token,
        }
    )


def test_gitlab_tarball_over_https_with_the_token_in_a_header(https_server: int, root: str) -> None:
    Archives.archives = {
        "v2.0.0": tarball(
            {
                "ivy-v2.0.0-abc/pyproject.toml": b'[project]\nversion = "2.0.0"\n',
                "ivy-v2.0.0-abc/src/x.py": b"x = 1\n",
            }
        )
    }
    progress: list[str] = []
    target = download_source_code(gitlab(https_server), "2.0.0", progress.append)
    assert open(os.path.join(target, "src", "x.py")).read() == "x = 1\n"
    assert all(TOKEN not in path for path in Archives.seen_paths)  # never in the URL
    assert all(TOKEN not in line for line in progress)

    with pytest.raises(DownloadError, match="401") as refused:
        download_source_code(gitlab(https_server, token="wrong-token-456"), "2.0.1", print)
    assert "wrong-token-456" not in str(refused.value)
    with pytest.raises(DownloadError, match="404"):
        download_source_code(gitlab(https_server), "2.0.2", print)


@pytest.mark.parametrize(
    ("members", "links"),
    [
        ({"root/pyproject.toml": b"", "root/../../escaped": b"boom"}, None),
        ({"/etc/ivy-absolute": b"boom"}, None),
        ({"root/pyproject.toml": b""}, {"root/link": "/etc/passwd"}),
    ],
    ids=["dot-dot", "absolute", "link-outside"],
)
def test_unsafe_tarballs_are_refused_and_nothing_escapes(
    https_server: int, root: str, tmp_path: Any, members: dict[str, bytes], links: Any
) -> None:
    Archives.archives = {"v3.0.0": tarball(members, links)}
    with pytest.raises(DownloadError, match=r"unsafe archive member|one top-level"):
        download_source_code(gitlab(https_server), "3.0.0", print)
    assert not os.path.exists(os.path.join(root, "3.0.0"))
    assert not os.path.exists(os.path.join(os.path.dirname(root), "escaped"))
    assert [n for n in os.listdir(root) if n.startswith(".staging")] == []
