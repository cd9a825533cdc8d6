"""`align rank serve SOURCE`: labelers rank in a browser (InstructGPT's labeling step, for real people).

    align rank export --config recipes/tiny/rank.yaml --output sheet.csv
    align rank serve sheet.csv                       # http://127.0.0.1:8765/ ; log: sheet.csv.annotations.jsonl
    align rank import sheet.csv.annotations.jsonl --output_dir runs/tiny/rank_human [--disagreement majority]

SOURCE is a ranking sheet (.csv/.jsonl, as `align rank export` writes; its `ranking` column is ignored), a dir holding
one, or an `align rank` output dir (its rankings.jsonl: people re-rank the model-labeled groups). Each annotator gives
a name, then sees one group at a time: the prompt and its K responses as plain text, ordered by drag or keyboard,
ties and per-response flags allowed. Every submission is appended to the log (`align.data.annotations`) and fsynced
before the page moves on; the log is the only state, so a closed tab or a restarted server resumes where each
annotator left off. The page shows the annotators' pairwise agreement.

Safety: binds 127.0.0.1 and checks the Host header (no DNS rebinding); `--host` other than loopback needs a token
(`--token` or ALIGN_RANK_TOKEN), which every request must carry. The page loads nothing from outside (a nonce'd
inline script, CSP `default-src 'none'`) and shows all data as text. Requests are validated; a bad one gets a 4xx
with one clear message and writes nothing. Why the standard library's http.server: docs/labeling.md.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from align.data import annotations as ann
from align.data import sources
from align.data.rankings import ranking_to_ranks
from align.errors import AlignError
from align.io import output_lock
from align.stages.rank import (
    HUMAN,
    RANKINGS_FILE,
    SHEET_META_SUFFIX,
    SHEET_SUFFIXES,
    finish,
    group_stats,
    start_output,
)
from align.stages.rank_sheet import _sheet_parser, read_sheet, sheet_responses

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_FLAGS = ("unsafe", "off-topic")
TOKEN_ENV = "ALIGN_RANK_TOKEN"
LOG_SUFFIX = ".annotations.jsonl"
DIR_LOG = "annotations.jsonl"
MAX_BODY = 16 * 1024  # a submission is ids, a ranking and flags: well under 1 KiB for K = 9
TEMPLATE = "templates/rank_serve.html"
SUBMIT_KEYS = {"annotator", "group", "ranking", "flags", "submission"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Group:
    id: str
    prompt: str
    responses: list[str]
    sha256: str


# ---------------------------------------------------------------------------------------------------------------------
# Groups and the log


def resolve_source(source: str | os.PathLike) -> Path:
    """The file the groups come from: a sheet, the one sheet in a dir, or an `align rank` dir's rankings.jsonl."""
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() not in SHEET_SUFFIXES:
            raise AlignError(f"{path}: unsupported sheet type '{path.suffix}'. Use .csv or .jsonl.")
        return path
    if not path.is_dir():
        raise AlignError(f"{path}: no such file or dir. Give the sheet `align rank export` wrote, or its dir.")
    if (path / RANKINGS_FILE).is_file():
        return path / RANKINGS_FILE
    sheets = sorted(p for p in path.iterdir() if p.suffix.lower() in SHEET_SUFFIXES and p.is_file()
                    and not p.name.endswith(LOG_SUFFIX) and p.name != DIR_LOG)  # fmt: skip
    if len(sheets) != 1:
        found = ", ".join(p.name for p in sheets) or "none"
        raise AlignError(f"{path}: expected one ranking sheet (.csv/.jsonl) or {RANKINGS_FILE}, found {found}. "
                         "Name the sheet itself.")  # fmt: skip
    return sheets[0]


def default_log(source: str | os.PathLike) -> Path:
    """SHEET.annotations.jsonl beside a sheet; DIR/annotations.jsonl for a dir."""
    path = Path(source)
    return path / DIR_LOG if path.is_dir() else Path(str(path) + LOG_SUFFIX)


def load_groups(path: Path) -> list[Group]:
    """The groups of a sheet (or rankings.jsonl), validated; ids from the `id` column, else the 1-based row."""
    rows = read_sheet(path)
    if not rows:
        raise AlignError(f"{path}: no rows. Export a sheet with `align rank export`.")
    groups, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"{path}:{n}"
        gid = str(row.get("id") if row.get("id") not in (None, "") else n)
        if gid in seen:
            raise AlignError(f"{where}: id {gid} repeats an earlier row's. Give every row its own id.")
        seen.add(gid)
        prompt, responses = row.get("prompt"), sheet_responses(row, where)
        if not isinstance(prompt, str) or not prompt.strip():
            raise AlignError(f"{where}: 'prompt' is {prompt!r}; a group needs a prompt. Fix or drop the row.")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise AlignError(f"{where}: a group needs at least 2 responses (strings). Fix or drop the row.")
        groups.append(Group(gid, prompt, list(responses), ann.group_sha256(prompt, responses)))
    return groups


class Log:
    """The annotations log, held (`flock`) for the server's life so a second server cannot interleave; records are
    appended with one write and fsynced before `append` returns."""

    def __init__(self, path: Path, groups: dict[str, Group], source: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise AlignError(f"{path}: another `align rank serve` holds this log. Stop it, or serve another "
                                 "--annotations file.") from None  # fmt: skip
            raise
        self.replay, complete = ann.read_log(path)
        size = os.fstat(self.fd).st_size
        if size > complete:
            # A write cut short by a crash: its submission was never acknowledged, so the page still holds it.
            logger.warning("%s: dropping an incomplete last line (%d bytes) left by a crash; it was never saved.",
                           path, size - complete)  # fmt: skip
            os.ftruncate(self.fd, complete)
            os.fsync(self.fd)
        for (_, gid), rec in self.replay.active.items():
            group = groups.get(gid)
            if group is None or group.sha256 != rec["group_sha256"]:
                what = "is not in" if group is None else "has another prompt or responses in"
                raise AlignError(f"{path}: group {gid}, ranked by {rec['annotator']}, {what} {source}. Serve the "
                                 "sheet it was ranked on, or start a new --annotations file.")  # fmt: skip
        if self.replay.header is None:
            self.append({"kind": "header", "format": ann.FORMAT, "source": str(source), "created": _now()})

    def append(self, rec: dict[str, Any]) -> None:
        ann.check_record(rec, str(self.path))
        data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        os.fsync(self.fd)
        self.replay.apply(rec, str(self.path))

    def close(self) -> None:
        os.close(self.fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------------------------------
# The application: state, submit, skip, undo (HTTP-free, one lock)


class RankApp:
    def __init__(self, groups: list[Group], log: Log, *, flags: tuple[str, ...] = DEFAULT_FLAGS,
                 token: str | None = None, loopback: bool = True, source: str = ""):  # fmt: skip
        self.groups = groups
        self.by_id = {g.id: g for g in groups}
        self.log = log
        self.flags = flags
        self.token = token
        self.loopback = loopback
        self.source = source
        self.lock = threading.Lock()

    # -- reads

    def state(self, annotator: str, group: str | None = None) -> dict[str, Any]:
        """What the page shows `annotator`: progress, agreement, and the group to rank (`group`, else the next)."""
        who = self._annotator(annotator)
        with self.lock:
            replay = self.log.replay
            done = [g.id for g in self.groups if (who, g.id) in replay.active]
            skips = replay.skipped.get(who, {})
            if group is not None:
                shown = self._group(group)
            else:
                todo = [g for g in self.groups if (who, g.id) not in replay.active]
                fresh = [g for g in todo if g.id not in skips]
                shown = fresh[0] if fresh else min(todo, key=lambda g: skips[g.id]) if todo else None
            previous = replay.active.get((who, shown.id)) if shown else None
            stack = replay.stack.get(who, [])
            return {
                "annotator": who,
                "source": self.source,
                "total": len(self.groups),
                "done": len(done),
                "skipped": sum(1 for g in skips if (who, g) not in replay.active),
                "flags": list(self.flags),
                "undo": replay.ids[stack[-1]]["group"] if stack else None,
                "group": None if shown is None else {
                    "id": shown.id, "position": self.groups.index(shown) + 1, "prompt": shown.prompt,
                    "responses": shown.responses,
                    "ranking": previous["ranking"] if previous else None,
                    "flags": previous["flags"] if previous else None,
                },  # fmt: skip
                "agreement": ann.agreement(replay),
            }

    # -- writes: each checks everything first, then appends one fsynced record

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(body) - SUBMIT_KEYS)
        if unknown:
            raise HTTPError(400, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(SUBMIT_KEYS))}.")
        who = self._annotator(body.get("annotator"))
        group = self._group(body.get("group"))
        sid = body.get("submission")
        if not isinstance(sid, str) or not ann.SUBMISSION_RE.match(sid):
            raise HTTPError(400, f"submission id {sid!r} is not 8-64 letters, digits or '-'. Reload the page.")
        k = len(group.responses)
        ranking = body.get("ranking")
        try:
            ranking_to_ranks(ranking, k, where=f"group {group.id}")
        except AlignError as e:
            raise HTTPError(400, str(e)) from None
        ranking = [list(b) if isinstance(b, list) else [b] for b in ranking]
        flags = body.get("flags")
        if flags is None:
            flags = [[] for _ in range(k)]
        if not (isinstance(flags, list) and len(flags) == k and all(isinstance(f, list) for f in flags)):
            raise HTTPError(400, f"flags must be {k} lists (one per response) of flag names.")
        for i, fs in enumerate(flags):
            bad = [f for f in fs if f not in self.flags]
            if bad or len(set(fs)) != len(fs):
                raise HTTPError(400, f"flags of response {i}: {fs!r}; each flag once, from {', '.join(self.flags)}.")
        with self.lock:
            replay = self.log.replay
            earlier = replay.ids.get(sid)
            if earlier is not None:
                if replay.active.get((who, group.id)) is earlier:
                    return {"ok": True, "duplicate": True}  # a retry of a saved submission: saved once
                raise HTTPError(409, f"submission {sid} was undone or is another group's. Reload the page.")
            active = replay.active.get((who, group.id))
            if active is not None:
                raise HTTPError(409, f"{who} already ranked group {group.id}. Undo that submission to change it.")
            self.log.append({"kind": "submit", "id": sid, "annotator": who, "group": group.id, "ranking": ranking,
                             "flags": [sorted(f) for f in flags], "prompt": group.prompt,
                             "responses": group.responses, "group_sha256": group.sha256,
                             "time": _now()})  # fmt: skip
        return {"ok": True}

    def skip(self, body: dict[str, Any]) -> dict[str, Any]:
        self._keys(body, {"annotator", "group"})
        who = self._annotator(body.get("annotator"))
        group = self._group(body.get("group"))
        with self.lock:
            if (who, group.id) in self.log.replay.active:
                raise HTTPError(409, f"{who} already ranked group {group.id}; nothing to skip.")
            self.log.append({"kind": "skip", "annotator": who, "group": group.id, "time": _now()})
        return {"ok": True}

    def undo(self, body: dict[str, Any]) -> dict[str, Any]:
        """Withdraw the annotator's last submission; the state shows that group again, its ranking preloaded."""
        self._keys(body, {"annotator"})
        who = self._annotator(body.get("annotator"))
        with self.lock:
            stack = self.log.replay.stack.get(who)
            if not stack:
                raise HTTPError(409, f"{who} has no submission to undo.")
            rec = self.log.replay.ids[stack[-1]]
            self.log.append({"kind": "undo", "id": rec["id"], "annotator": who, "group": rec["group"],
                             "time": _now()})  # fmt: skip
        state = self.state(who, rec["group"])
        state["group"]["ranking"], state["group"]["flags"] = rec["ranking"], rec["flags"]
        return state

    # -- checks

    def _annotator(self, name: Any) -> str:
        try:
            return ann.check_annotator(name, "annotator")
        except AlignError as e:
            raise HTTPError(400, str(e)) from None

    def _group(self, gid: Any) -> Group:
        group = self.by_id.get(gid) if isinstance(gid, str) else None
        if group is None:
            first, last = self.groups[0].id, self.groups[-1].id
            raise HTTPError(404, f"unknown group {gid!r}; this sheet's groups are {first}..{last}.")
        return group

    @staticmethod
    def _keys(body: dict[str, Any], allowed: set[str]) -> None:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise HTTPError(400, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}.")

    def check_token(self, given: str | None) -> None:
        if self.token is None:
            return
        if not given:
            raise HTTPError(401, "this server needs its token: open the page as /?token=YOUR_TOKEN.")
        if not hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8")):
            raise HTTPError(403, "wrong token. Open the page with the token the server was started with.")

    def check_host(self, host: str | None) -> None:
        """On loopback, only requests addressed to loopback: a web page elsewhere cannot reach us by DNS rebinding."""
        if not self.loopback:
            return
        name = urlsplit(f"//{host or ''}").hostname or ""
        if name != "localhost" and not _is_loopback(name):
            raise HTTPError(403, f"Host {host!r} is not this loopback server. Open http://127.0.0.1:PORT/.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------------------
# HTTP


def page_html(nonce: str) -> str:
    return files("align").joinpath(TEMPLATE).read_text(encoding="utf-8").replace("__NONCE__", nonce)


class Handler(BaseHTTPRequestHandler):
    server_version = "align-rank"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        app: RankApp = self.server.app  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            app.check_host(self.headers.get("Host"))
            app.check_token(self.headers.get("X-Align-Token") or (query.get("token") or [None])[0])
            routes = {("GET", "/"): None, ("GET", "/api/state"): None, ("POST", "/api/submit"): app.submit,
                      ("POST", "/api/skip"): app.skip, ("POST", "/api/undo"): app.undo}  # fmt: skip
            if (method, url.path) not in routes:
                if any(path == url.path for _, path in routes):
                    raise HTTPError(405, f"{method} {url.path} is not allowed.")
                raise HTTPError(404, f"no such page {url.path!r}.")
            if method == "GET" and url.path == "/":
                self._page()
                return
            if method == "GET":
                group = (query.get("group") or [None])[0]
                self._json(200, app.state((query.get("annotator") or [None])[0], group))
                return
            body = self._body()
            result = routes[(method, url.path)](body)
            if result.get("ok"):
                result = {**app.state(body["annotator"]), "duplicate": result.get("duplicate", False)}
            self._json(200, result)
        except HTTPError as e:
            self.close_connection = True  # a body may be left unread: the connection cannot carry another request
            self._json(e.status, {"error": e.message})

    def _body(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(411, "send the body with a Content-Length, not chunked.")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HTTPError(411, "a Content-Length header is required.")
        if int(length) > MAX_BODY:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise HTTPError(413, f"body of {int(length)} bytes; the limit is {MAX_BODY}.")
        raw = self.rfile.read(int(length))
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":  # also keeps cross-site forms out: they cannot send JSON without CORS
            raise HTTPError(415, f"Content-Type {ctype or 'none'!r}; send application/json.")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"body is not JSON ({e}).") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"body is a JSON {type(body).__name__}; send an object.")
        return body

    def _send(self, status: int, ctype: str, data: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the page's URL may hold the token
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        self._send(status, "application/json; charset=utf-8", json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    def _page(self) -> None:
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
        self._send(200, "text/html; charset=utf-8", page_html(nonce).encode("utf-8"),
                   {"Content-Security-Policy": csp, "X-Frame-Options": "DENY"})  # fmt: skip

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The path without its query: the token may be in it.
        logger.debug("%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug(format, *args)


class RankServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: RankApp, host: str, port: int):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app = app
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise AlignError(f"port {port} on {host} is in use. Pass --port 0 for a free one.") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise AlignError(f"--host {host}: not an address of this machine.") from None
            raise


def make_server(source: str | os.PathLike, *, annotations: str | os.PathLike | None = None, host: str = DEFAULT_HOST,
                port: int = DEFAULT_PORT, token: str | None = None,
                flags: tuple[str, ...] = DEFAULT_FLAGS) -> RankServer:  # fmt: skip
    """Check host and token, load the groups, open (and lock) the log, bind. Nothing is bound before the checks."""
    loopback = _is_loopback(host)
    if not loopback and not token:
        raise AlignError(f"--host {host} is not loopback: anyone on that network could reach the page. Give a "
                         f"token (--token or {TOKEN_ENV}, e.g. `python -c 'import secrets; print(secrets."
                         "token_urlsafe())'`); the page then refuses requests without it.")  # fmt: skip
    if token is not None and len(token) < 16:
        raise AlignError("--token: shorter than 16 characters. Use e.g. `python -c 'import secrets; "
                         "print(secrets.token_urlsafe())'`.")  # fmt: skip
    for f in flags:
        if not ann.NAME_RE.match(f):
            raise AlignError(f"--flags: {f!r} is not a short name (letters, digits, space . @ ' - _).")
    path = resolve_source(source)
    groups = load_groups(path)
    log_path = Path(annotations) if annotations else default_log(source)
    log = Log(log_path, {g.id: g for g in groups}, path)
    app = RankApp(groups, log, flags=tuple(flags), token=token, loopback=loopback, source=str(path))
    try:
        return RankServer(app, host, port)
    except BaseException:
        log.close()
        raise


def serve(server: RankServer, max_requests: int | None = None) -> None:
    """Serve until interrupted, or for `max_requests` requests (tests, demos)."""
    try:
        if max_requests is None:
            server.serve_forever()
        else:
            for _ in range(max_requests):
                server.handle_request()
    finally:
        server.server_close()
        server.app.log.close()


def serve_main(argv: list[str]) -> int:
    """`align rank serve SOURCE [--annotations LOG] [--host H --token T] [--port P] [--flags a,b]`."""
    parser = _sheet_parser("align rank serve", "Serve a local page where people rank the groups of SOURCE (a sheet "
                           "from `align rank export`, its dir, or an `align rank` output dir).")  # fmt: skip
    parser.add_argument("source", help="A ranking sheet (.csv/.jsonl), a dir holding one, or an `align rank` dir.")
    parser.add_argument("--annotations", help=f"The log to append to (default: SHEET{LOG_SUFFIX}, or DIR/{DIR_LOG}).")
    parser.add_argument("--host", default=DEFAULT_HOST, help="Interface to bind (default 127.0.0.1). Any other "
                        f"than loopback needs --token or {TOKEN_ENV}.")  # fmt: skip
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port (default 8765; 0: any free one).")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV), help="A secret every request must carry "
                        f"(the page: /?token=...). Prefer {TOKEN_ENV}: others can read a command line.")  # fmt: skip
    parser.add_argument("--flags", default=",".join(DEFAULT_FLAGS), help="Per-response flags the annotator may set, "
                        "comma-separated (default: unsafe,off-topic).")  # fmt: skip
    parser.add_argument("--max_requests", type=int, default=None, help="Stop after this many requests (tests).")
    args = parser.parse_args(argv)
    flags = tuple(f.strip() for f in args.flags.split(",") if f.strip())
    server = make_server(args.source, annotations=args.annotations, host=args.host, port=args.port,
                         token=args.token or None, flags=flags)  # fmt: skip
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    app = server.app
    state = app.log.replay
    logger.info("rank serve: %d groups from %s; log %s (%d submissions so far, %d annotators).", len(app.groups),
                app.source, app.log.path, len(state.active), len(state.annotators()))  # fmt: skip
    logger.info("rank serve: open http://%s:%d/%s  (Ctrl+C stops; nothing is lost)", shown, port,
                "?token=<your token>" if app.token else "")  # fmt: skip
    try:
        serve(server, args.max_requests)
    except KeyboardInterrupt:
        logger.info("rank serve: stopped. Resume with the same command.")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Import: the log -> the rank output dir `align reward` reads


def import_annotations(log: str | os.PathLike, output_dir: str | os.PathLike, policy: str = "majority") -> Path:
    """Replay `log` and write `output_dir` as `align rank` does (labeler: human), disagreements under `policy`
    (`align.data.annotations.merge`)."""
    path = Path(log)
    replay, complete = ann.read_log(path)
    if path.stat().st_size > complete:
        logger.warning("%s: its last line is incomplete (a crash mid-write; never acknowledged); left out.", path)
    rows, dropped = ann.merge(replay, policy)
    if not rows:
        fix = "use --disagreement per_annotator" if dropped else "rank some groups with `align rank serve`"
        raise AlignError(f"{path}: no submissions{' with a majority ranking' if dropped else ''}; {fix}.")
    if dropped:
        logger.warning("rank import: %d groups have no ranking that more than half their annotators gave; dropped "
                       "(majority). --disagreement per_annotator keeps them all.", dropped)  # fmt: skip
    source = Path((replay.header or {}).get("source", ""))
    meta_file = Path(str(source) + SHEET_META_SUFFIX)
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if source.name and meta_file.is_file() else {}
    prompts = [r["prompt"] for r in rows]
    groups = [r["responses"] for r in rows]
    rankings = [r["ranking"] for r in rows]
    agree = ann.agreement(replay)
    metrics: dict[str, Any] = {
        "num_groups": len(rows),
        "num_prompts": len({r["group"] for r in rows}),
        "k": max(len(g) for g in groups),
        "dropped_all_tied": 0,
        "dropped_empty": 0,
        "dropped_no_majority": dropped,
        "annotators": len(replay.annotators()),
        "submissions": len(replay.active),
        "annotator_agreement": math.nan if agree["value"] is None else agree["value"],
        "flagged_responses": sum(bool(f) for r in rows for f in r["flags"]),
        **group_stats(prompts, groups, rankings, gold=bool(meta.get("tinyworld")) or sources.gold_prompts(prompts)),
    }
    out = Path(output_dir)
    data = {"name": str(path), "rows": len(rows), "exported": meta.get("data")}
    with output_lock(out):
        start_output(out)
        finish(out, rows, metrics=metrics, parent=meta.get("parent"), recipe=meta.get("recipe") or {}, data=data,
               sampling=meta.get("sampling"), labeler={"name": HUMAN, "kind": HUMAN, "annotations": str(path),
               "disagreement": policy, "annotators": replay.annotators(), "agreement": agree})  # fmt: skip
    return out


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--disagreement", choices=ann.DISAGREEMENT_POLICIES, default=None,
                        help="For an `align rank serve` log: 'majority' (default; one row per group, the ranking more "
                        "than half its annotators gave, others dropped and counted) or 'per_annotator' (one row per "
                        "annotator and group).")  # fmt: skip
