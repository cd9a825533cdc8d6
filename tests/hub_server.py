"""A minimal Hugging Face Hub on 127.0.0.1: just the endpoints `huggingface_hub` 2.x calls to create a repo and commit.

Read from `huggingface_hub/hf_api.py`, `_commit_api.py` and `lfs.py` (2.4.0):

    POST /api/repos/create                                   create_repo ({"name", "organization", "type"})
    GET  /api/{models,datasets}/{ns}/{name}[/revision/{rev}] repo_info (create_repo(exist_ok) on 401/403 asks it)
    POST /api/validate-yaml                                  create_commit checks README.md metadata first
    POST /api/{type}s/{ns}/{name}/branch/{branch}            create_branch
    POST /api/{type}s/{ns}/{name}/preupload/{rev}            upload mode per file: "regular" or "lfs"
    POST /api/{type}s/{ns}/{name}/commit/{rev}               NDJSON: header, file (base64), lfsFile (sha256 oid)
    POST /[datasets/]{ns}/{name}.git/info/lfs/objects/batch  LFS batch API: where to PUT each object
    PUT  /_lfs/{oid}, POST /_lfs/{oid}/verify                LFS "basic" transfer + verify (our own hrefs)

Xet: with `hf_xet` installed, huggingface_hub sends every "lfs"-mode file through Xet storage, with no way for the
server to decline it. So by default this server answers "regular" for every file (content inline, base64, in the
commit), and the LFS path is exercised by answering "lfs" for `lfs_suffixes` while the test turns Xet off
(`huggingface_hub.constants.HF_HUB_DISABLE_XET = True`, the same switch as the env var).

State is in memory: `repos[(type, repo_id)]["branches"][branch] = {path: bytes}`; `requests` logs (method, path,
authorization header) of every call, for tests to assert on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


class HubServer:
    """`with HubServer(tokens={"hf_x": "write"}) as hub: ...` serves on `hub.url` until the block ends.

    Args:
        tokens: token -> "write" or "read"; a request with another token (or none) gets 401, a read token 403.
        lfs_suffixes: files ending so are "lfs" in preupload (the rest "regular").
        namespace: the user a repo without a namespace is created under.
        fail_commit: repo id -> HTTP status to answer its commits with (a failure after the repo was created).
    """

    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        *,
        lfs_suffixes: tuple[str, ...] = (),
        namespace: str = "tester",
        fail_commit: dict[str, int] | None = None,
    ):
        self.tokens = dict(tokens or {})
        self.lfs_suffixes = lfs_suffixes
        self.namespace = namespace
        self.fail_commit = dict(fail_commit or {})
        self.repos: dict[tuple[str, str], dict[str, Any]] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Views for tests

    def files(self, repo_id: str, repo_type: str = "model", branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[(repo_type, repo_id)]["branches"][branch])

    def commits(self, repo_id: str, repo_type: str = "model") -> list[dict[str, Any]]:
        return list(self.repos[(repo_type, repo_id)]["commits"])

    def endpoints(self) -> set[str]:
        """The (method, route) pairs called, with repo ids, revisions and oids replaced by placeholders."""
        out = set()
        for method, path, _ in self.requests:
            route = re.sub(r"^/api/(models|datasets)/[^/]+/[^/]+/", r"/api/\1/{repo}/", path)
            route = re.sub(r"/(preupload|commit|branch)/.*$", r"/\1/{rev}", route)
            route = re.sub(r"^/(datasets/)?[^/]+/[^/]+\.git/", r"/\1{repo}.git/", route)
            route = re.sub(r"^/_lfs/[0-9a-f]{64}", "/_lfs/{oid}", route)
            route = re.sub(r"^/api/(models|datasets)/[^/]+/[^/]+$", r"/api/\1/{repo}", route)
            out.add(f"{method} {route}")
        return out


class _Handler(BaseHTTPRequestHandler):
    server_state: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub; every reply sets Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures, not access logs
        pass

    # Plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _auth(self, write: bool = True) -> bool:
        """401 without a known token, 403 for a read token on a write call; True when the request may go on."""
        header = self.headers.get("Authorization") or ""
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else None
        role = self.server_state.tokens.get(token or "")
        if role is None:
            self._error(401, "Invalid credentials in Authorization header")
            return False
        if write and role != "write":
            self._error(403, "You don't have the rights to create or write to this repo")
            return False
        return True

    def _repo(self, kind: str, repo_id: str) -> dict[str, Any] | None:
        repo = self.server_state.repos.get((_TYPES[kind], repo_id))
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _handle(self, method: str) -> None:
        path = urlsplit(self.path).path
        hub = self.server_state
        body = self._body() if method in ("POST", "PUT") else b""
        with hub.lock:
            hub.requests.append((method, path, self.headers.get("Authorization")))
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if method == "POST" and m:
            kind, repo_id, action, rev = m.group(1), m.group(2), m.group(3), unquote(m.group(4))
            return getattr(self, f"_{action}")(kind, repo_id, rev, body)
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if method == "GET" and m:
            return self._info(m.group(1), m.group(2))
        m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if method == "POST" and m:
            return self._lfs_batch(json.loads(body))
        m = re.fullmatch(r"/_lfs/([0-9a-f]{64})(/verify)?", path)
        if m and method == "PUT" and not m.group(2):
            return self._lfs_put(m.group(1), body)
        if m and method == "POST" and m.group(2):
            return self._lfs_verify(m.group(1), json.loads(body))
        self._error(404, f"no route for {method} {path} in tests/hub_server.py")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # Endpoints

    def _create(self, payload: dict[str, Any]) -> None:
        if not self._auth():
            return
        hub = self.server_state
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or hub.namespace}/{payload['name']}"
        url = f"{hub.url}/{_PREFIX[repo_type]}{repo_id}"
        with hub.lock:
            if (repo_type, repo_id) in hub.repos:
                return self._send(409, {"error": "You already created this repo", "url": url})
            # A new Hub repo has one commit (.gitattributes) on main; ours starts with main empty.
            hub.repos[(repo_type, repo_id)] = {
                "visibility": payload.get("visibility"),
                "branches": {"main": {}},
                "commits": [],
            }
        self._send(200, {"url": url, "name": repo_id})

    def _info(self, kind: str, repo_id: str) -> None:
        if not self._auth(write=False):
            return
        repo = self._repo(kind, repo_id)
        if repo is not None:
            sha = repo["commits"][-1]["oid"] if repo["commits"] else "0" * 40
            self._send(200, {"id": repo_id, "sha": sha, "private": repo["visibility"] == "private", "siblings": []})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        import yaml

        content = payload.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            return self._send(400, {"errors": [{"message": f"YAML: {e}"}], "warnings": []})
        if not isinstance(meta, dict):
            return self._send(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def _branch(self, kind: str, repo_id: str, branch: str, body: bytes) -> None:
        if not self._auth():
            return
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        with self.server_state.lock:
            if branch in repo["branches"]:
                return self._error(409, "Reference already exists")
            repo["branches"][branch] = dict(repo["branches"]["main"])
        self._send(200, {})

    def _preupload(self, kind: str, repo_id: str, rev: str, body: bytes) -> None:
        if not self._auth():
            return
        if self._repo(kind, repo_id) is None:
            return
        files = json.loads(body)["files"]
        lfs = self.server_state.lfs_suffixes
        modes = [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(lfs) else "regular", "shouldIgnore": False}
            for f in files
        ]
        self._send(200, {"files": modes, "commitOid": "0" * 40})

    def _commit(self, kind: str, repo_id: str, rev: str, body: bytes) -> None:
        hub = self.server_state
        if not self._auth():
            return
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        if repo_id in hub.fail_commit:
            return self._error(hub.fail_commit[repo_id], "commit refused by the test server")
        if rev not in repo["branches"]:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header, changes = lines[0], {}
        assert header["key"] == "header", header
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                assert value["encoding"] == "base64"
                changes[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = hub.lfs.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    return self._error(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                changes[value["path"]] = data
            else:
                return self._error(400, f"unsupported commit operation {item['key']}")
        oid = hashlib.sha1(body).hexdigest()
        with hub.lock:
            repo["branches"][rev].update(changes)
            repo["commits"].append(
                {
                    "oid": oid,
                    "branch": rev,
                    "summary": header["value"]["summary"],
                    "description": header["value"].get("description", ""),
                    "paths": sorted(changes),
                }
            )
        url = f"{hub.url}/{_PREFIX[_TYPES[kind]]}{repo_id}/commit/{oid}"
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": url})

    def _lfs_batch(self, payload: dict[str, Any]) -> None:
        if not self._auth():
            return
        hub = self.server_state
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in hub.lfs:  # already stored: no "actions", the client skips the upload
                entry["actions"] = {
                    "upload": {"href": f"{hub.url}/_lfs/{obj['oid']}"},
                    "verify": {"href": f"{hub.url}/_lfs/{obj['oid']}/verify"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        # The presigned S3 URL of the real Hub needs no Authorization header; neither does ours.
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "content does not match its sha256 oid")
        with self.server_state.lock:
            self.server_state.lfs[oid] = body
        self._send(200, {})

    def _lfs_verify(self, oid: str, payload: dict[str, Any]) -> None:
        if not self._auth():
            return
        data = self.server_state.lfs.get(oid)
        if data is None or len(data) != payload.get("size"):
            return self._error(404, f"LFS object {oid} not found")
        self._send(200, {})
