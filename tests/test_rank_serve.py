"""`align rank serve` without a browser: every bad request gets its 4xx and leaves the log byte for byte unchanged;
the token; the log's replay (resume, retries saved once, undo, a torn last line); agreement by hand; the import's two
disagreement policies. The servers bind 127.0.0.1 on a free port, in a thread stopped at the end of each test."""

import http.client
import json
import threading
from pathlib import Path

import pytest

from align.cli import main as cli_main
from align.data import annotations as ann
from align.errors import AlignError
from align.stages import rank_serve

TOKEN = "t0ken-for-the-test-0123456789"
GROUPS = [
    {"id": "g1", "prompt": "first prompt", "responses": ["a", "b", "c"]},
    {"id": "g2", "prompt": "second prompt", "responses": ["d", "e", "f"]},
    {"id": "g3", "prompt": "third prompt", "responses": ["g", "h"]},
]


def write_sheet(path: Path, groups=GROUPS) -> Path:
    path.write_text("".join(json.dumps({**g, "ranking": ""}) + "\n" for g in groups))
    return path


class Running:
    """A server in a thread; `request` speaks raw HTTP so tests can send what a browser would not."""

    def __init__(self, server: rank_serve.RankServer):
        self.server = server
        self.port = server.server_address[1]
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        res = conn.getresponse()
        payload = res.read()
        conn.close()
        ctype = res.getheader("Content-Type") or ""
        return res.status, json.loads(payload) if ctype.startswith("application/json") else payload.decode()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()
        self.server.app.log.close()


@pytest.fixture
def sheet(tmp_path) -> Path:
    return write_sheet(tmp_path / "sheet.jsonl")


@pytest.fixture
def running(sheet):
    servers = []

    def start(**kw) -> Running:
        r = Running(rank_serve.make_server(sheet, port=0, **kw))
        servers.append(r)
        return r

    yield start
    for r in servers:
        if r.thread.is_alive():
            r.stop()


def submit(srv: Running, who: str, group: str, ranking, sid: str, flags=None):
    body = {"annotator": who, "group": group, "ranking": ranking, "submission": sid}
    if flags is not None:
        body["flags"] = flags
    return srv.request("POST", "/api/submit", body)


def log_of(sheet: Path) -> Path:
    return Path(str(sheet) + rank_serve.LOG_SUFFIX)


# ---------------------------------------------------------------------------------------------------------------------
# Bad requests: a 4xx with a clear message, and nothing written


GOOD = {"annotator": "ana", "group": "g1", "ranking": [[2], [0, 1]], "submission": "sub-00000001"}


@pytest.mark.parametrize(
    ("method", "path", "change", "status", "message"),
    [
        ("POST", "/api/submit", {"group": "g9"}, 404, "unknown group 'g9'"),
        ("POST", "/api/submit", {"ranking": [[0], [0], [1]]}, 400, "lists response 0 twice"),
        ("POST", "/api/submit", {"ranking": [[0], [1]]}, 400, "covers 2 of 3 responses"),
        ("POST", "/api/submit", {"ranking": [[0], [1], [3]]}, 400, "index 3 is out of range"),
        ("POST", "/api/submit", {"ranking": [[0, 1, 2]]}, 400, "all 3 responses are tied"),
        ("POST", "/api/submit", {"ranking": "2>0=1"}, 400, "expected a non-empty list"),
        ("POST", "/api/submit", {"ranking": [[0], ["1"], [2]]}, 400, "expected an int index"),
        ("POST", "/api/submit", {"annotator": "<script>"}, 400, "annotator '<script>' is not a name"),
        ("POST", "/api/submit", {"annotator": None}, 400, "annotator None is not a name"),
        ("POST", "/api/submit", {"submission": "x"}, 400, "submission id 'x'"),
        ("POST", "/api/submit", {"flags": [["unsafe"], ["rude"], []]}, 400, "flags of response 1"),
        ("POST", "/api/submit", {"flags": [[], []]}, 400, "flags must be 3 lists"),
        ("POST", "/api/submit", {"extra": 1}, 400, "unknown field(s) extra"),
        ("POST", "/api/skip", {"ranking": None}, 400, "unknown field(s) ranking, submission"),
        ("POST", "/api/undo", {"group": None}, 400, "unknown field(s)"),
        ("POST", "/api/nothing", {}, 404, "no such page '/api/nothing'"),
        ("GET", "/api/submit", None, 405, "GET /api/submit is not allowed"),
        ("GET", "/api/state?annotator=ana&group=g7", None, 404, "unknown group 'g7'"),
        ("GET", "/api/state", None, 400, "annotator None is not a name"),
    ],
)
def test_bad_requests_get_4xx_and_write_nothing(running, sheet, method, path, change, status, message):
    srv = running()
    before = log_of(sheet).read_bytes()
    body = None if change is None else {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    if path == "/api/skip":
        body = {"annotator": "ana", "group": "g1", "ranking": [[0], [1, 2]], "submission": "sub-00000001"}
    got_status, got = srv.request(method, path, body)
    assert got_status == status and message in got["error"], got
    assert log_of(sheet).read_bytes() == before


@pytest.mark.parametrize(
    ("raw", "headers", "status", "message"),
    [
        (b"{not json", {}, 400, "body is not JSON"),
        (b"[1, 2]", {}, 400, "body is a JSON list"),
        (json.dumps(GOOD).encode(), {"Content-Type": "text/plain"}, 415, "send application/json"),
        (json.dumps(GOOD).encode(), {"Host": "evil.example:80"}, 403, "Host 'evil.example:80' is not this loopback"),
        (b"x" * (rank_serve.MAX_BODY + 1), {}, 413, f"the limit is {rank_serve.MAX_BODY}"),
    ],
)
def test_malformed_bodies_and_hosts(running, sheet, raw, headers, status, message):
    srv = running()
    before = log_of(sheet).read_bytes()
    got_status, got = srv.request("POST", "/api/submit", raw=raw, headers=headers)
    assert got_status == status and message in got["error"], got
    assert log_of(sheet).read_bytes() == before


def test_oversize_body_is_refused_unread(running, sheet):
    # Content-Length says 10 MB and nothing follows: the answer comes from the header alone, nothing is read or written
    srv = running()
    before = log_of(sheet).read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.putrequest("POST", "/api/submit")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10 * 1024 * 1024))
    conn.endheaders()
    res = conn.getresponse()
    assert res.status == 413 and "10485760 bytes" in json.loads(res.read())["error"]
    conn.close()
    assert log_of(sheet).read_bytes() == before


def test_a_good_submission_writes_one_line(running, sheet):
    srv = running()
    status, state = submit(srv, **{"who": "ana", "group": "g1", "ranking": [[2], [0, 1]], "sid": "sub-00000001"},
                           flags=[["unsafe"], [], ["off-topic", "unsafe"]])  # fmt: skip
    assert status == 200 and state["done"] == 1 and state["group"]["id"] == "g2" and state["undo"] == "g1"
    rec = json.loads(log_of(sheet).read_text().splitlines()[-1])
    assert rec["kind"] == "submit" and rec["ranking"] == [[2], [0, 1]] and rec["flags"][2] == ["off-topic", "unsafe"]
    assert rec["group_sha256"] == ann.group_sha256("first prompt", ["a", "b", "c"])


# ---------------------------------------------------------------------------------------------------------------------
# The token


def test_token_is_required_on_every_request(sheet, tmp_path):
    # The app exactly as `--host 0.0.0.0 --token T` builds it (not loopback: no Host check, the token required), bound
    # to 127.0.0.1 here because tests bind loopback only.
    path = rank_serve.resolve_source(sheet)
    groups = rank_serve.load_groups(path)
    log = rank_serve.Log(log_of(sheet), {g.id: g for g in groups}, path)
    app = rank_serve.RankApp(groups, log, token=TOKEN, loopback=False)
    srv = Running(rank_serve.RankServer(app, "127.0.0.1", 0))
    try:
        before = log_of(sheet).read_bytes()
        assert srv.request("GET", "/")[0] == 401
        status, got = srv.request("POST", "/api/submit", GOOD)
        assert status == 401 and "needs its token" in got["error"]
        status, got = srv.request("POST", "/api/submit", GOOD, headers={"X-Align-Token": TOKEN[:-1] + "x"})
        assert status == 403 and "wrong token" in got["error"]
        assert srv.request("GET", "/api/state?annotator=ana&token=nope")[0] == 403
        assert log_of(sheet).read_bytes() == before
        status, page = srv.request("GET", f"/?token={TOKEN}")
        assert status == 200 and "<title>align rank</title>" in page
        assert srv.request("POST", "/api/submit", GOOD, headers={"X-Align-Token": TOKEN})[0] == 200
        headers = {"X-Align-Token": TOKEN, "Host": "x.y"}  # not loopback: any Host
        assert srv.request("GET", "/api/state?annotator=ana", headers=headers)[0] == 200
    finally:
        srv.stop()


def test_non_loopback_host_without_token_is_refused_before_binding(sheet, capsys, monkeypatch):
    monkeypatch.delenv(rank_serve.TOKEN_ENV, raising=False)
    with pytest.raises(AlignError, match="is not loopback"):
        rank_serve.make_server(sheet, host="0.0.0.0", port=0)
    assert not log_of(sheet).exists()  # refused before the log is opened, let alone a port bound
    assert cli_main(["rank", "serve", str(sheet), "--host", "192.0.2.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --host 192.0.2.1 is not loopback")
    with pytest.raises(AlignError, match="shorter than 16"):
        rank_serve.make_server(sheet, host="0.0.0.0", port=0, token="short")
    assert rank_serve._is_loopback("127.0.0.1") and rank_serve._is_loopback("::1")
    assert rank_serve._is_loopback("localhost") and not rank_serve._is_loopback("0.0.0.0")


def test_page_is_self_contained_and_locked_down(running):
    srv = running()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/")
    res = conn.getresponse()
    page = res.read().decode()
    csp = res.getheader("Content-Security-Policy")
    conn.close()
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in page and "__NONCE__" not in page
    assert "http://" not in page and "https://" not in page  # no external asset
    assert ".innerHTML" not in page  # all data goes in as text


# ---------------------------------------------------------------------------------------------------------------------
# The log: resume, retries, undo, a crash mid-write


def test_restart_resumes_and_a_retry_is_saved_once(running, sheet):
    srv = running()
    assert submit(srv, "ana", "g1", [[0], [1], [2]], "sub-00000001")[0] == 200
    assert srv.request("POST", "/api/skip", {"annotator": "ana", "group": "g2"})[1]["group"]["id"] == "g3"
    srv.stop()
    srv = running()  # a new server on the same log: ana resumes at g3 (g2 skipped), with 1 done
    state = srv.request("GET", "/api/state?annotator=ana")[1]
    assert (state["done"], state["skipped"], state["group"]["id"]) == (1, 1, "g3")
    # the page retries g1's submission (its answer was lost): saved once, not twice
    status, state = submit(srv, "ana", "g1", [[0], [1], [2]], "sub-00000001")
    assert status == 200 and state["duplicate"] is True
    # another submission for an already ranked group: refused until undone
    status, got = submit(srv, "ana", "g1", [[1], [0], [2]], "sub-00000002")
    assert status == 409 and "already ranked group g1" in got["error"]
    assert submit(srv, "ana", "g3", [[1], [0]], "sub-00000003")[0] == 200
    # undo the last submission (g3): it comes back with its ranking; the undone id cannot be replayed
    status, state = srv.request("POST", "/api/undo", {"annotator": "ana"})
    assert status == 200 and state["group"]["id"] == "g3" and state["group"]["ranking"] == [[1], [0]]
    status, got = submit(srv, "ana", "g3", [[1], [0]], "sub-00000003")
    assert status == 409 and "was undone" in got["error"]
    assert submit(srv, "ana", "g3", [[0], [1]], "sub-00000004")[0] == 200
    # only the skipped g2 is left, then nothing; undo twice walks back g3 then g1
    assert srv.request("GET", "/api/state?annotator=ana")[1]["group"]["id"] == "g2"
    assert submit(srv, "ana", "g2", [[2], [1], [0]], "sub-00000005")[1]["group"] is None
    kinds = [json.loads(line)["kind"] for line in log_of(sheet).read_text().splitlines()]
    assert kinds == ["header", "submit", "skip", "submit", "undo", "submit", "submit"]
    replay, _ = ann.read_log(log_of(sheet))
    assert {g: r["ranking"] for (_, g), r in replay.active.items()} == {
        "g1": [[0], [1], [2]], "g3": [[0], [1]], "g2": [[2], [1], [0]]}  # fmt: skip


def test_a_torn_last_line_is_cut_and_the_rest_kept(running, sheet, caplog):
    srv = running()
    submit(srv, "ana", "g1", [[0], [1], [2]], "sub-00000001")
    srv.stop()
    whole = log_of(sheet).read_bytes()
    with log_of(sheet).open("ab") as f:
        f.write(b'{"kind": "submit", "id": "sub-000')  # killed mid-write: never acknowledged
    srv = running()
    assert "incomplete last line (33 bytes)" in caplog.text
    assert log_of(sheet).read_bytes() == whole
    assert srv.request("GET", "/api/state?annotator=ana")[1]["done"] == 1


def test_one_server_per_log_and_the_sheet_must_match(running, sheet):
    srv = running()
    with pytest.raises(AlignError, match="another `align rank serve` holds this log"):
        rank_serve.make_server(sheet, port=0)
    submit(srv, "ana", "g1", [[0], [1], [2]], "sub-00000001")
    srv.stop()
    changed = [{**GROUPS[0], "responses": ["a", "b", "C"]}, *GROUPS[1:]]
    write_sheet(sheet, changed)
    with pytest.raises(AlignError, match="group g1, ranked by ana, has another prompt or responses in"):
        rank_serve.make_server(sheet, port=0)


def test_bad_log_lines_name_file_and_line(tmp_path):
    log = tmp_path / "a.annotations.jsonl"
    header = json.dumps({"kind": "header", "format": ann.FORMAT, "source": "s"})
    rec = {"kind": "submit", "id": "sub-00000001", "annotator": "ana", "group": "g1", "ranking": [[1], [0]],
           "flags": [[], []], "prompt": "p", "responses": ["x", "y"],
           "group_sha256": ann.group_sha256("p", ["x", "y"])}  # fmt: skip
    for bad, message in [
        ({**rec, "ranking": [[1], [1]]}, "lists response 1 twice"),
        ({**rec, "responses": ["x", "z"]}, "the line was edited"),
        ({**rec, "kind": "vote"}, "record kind 'vote'"),
        ({"kind": "undo", "id": "sub-00000009", "annotator": "ana", "group": "g1"}, "not ana's active ranking"),
    ]:
        log.write_text(header + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(AlignError, match=message) as e:
            ann.read_log(log)
        assert str(e.value).startswith(f"{log}:2:")


# ---------------------------------------------------------------------------------------------------------------------
# Agreement and the import


def test_agreement_by_hand_two_annotators_disagreeing_on_one_group(running, sheet):
    srv = running()
    # g1: ana and ben both 2 > 0 > 1: pairs (0,1) (0,2) (1,2) all agree: 3 of 3
    submit(srv, "ana", "g1", [[2], [0], [1]], "sub-00000001")
    submit(srv, "ben", "g1", [[2], [0], [1]], "sub-00000002")
    # g2: ana 0 > 1 > 2, ben 1 > 0 > 2: (0,1) opposite -> 0; (0,2) agree -> 1; (1,2) agree -> 1: 2 of 3
    submit(srv, "ana", "g2", [[0], [1], [2]], "sub-00000003")
    submit(srv, "ben", "g2", [[1], [0], [2]], "sub-00000004")
    # g3: only ana: no pair of annotators, not counted
    submit(srv, "ana", "g3", [[1], [0]], "sub-00000005")
    # (3 + 2) / (3 + 3) = 5/6
    agreement = srv.request("GET", "/api/state?annotator=ana")[1]["agreement"]
    assert agreement["value"] == pytest.approx(5 / 6)
    assert (agreement["comparisons"], agreement["groups"]) == (6, 2)
    assert agreement["pairs"] == [{"annotators": ["ana", "ben"], "agreement": pytest.approx(5 / 6), "comparisons": 6}]
    # a tie against an order counts 1/2: ranks [0, 0, 1] vs [0, 1, 2]: (0,1) tie vs order 1/2, (0,2) 1, (1,2) 1
    assert ann.pair_agreement([0, 0, 1], [0, 1, 2]) == (2.5, 3)


def test_import_majority_and_per_annotator(running, sheet, tmp_path, capsys):
    srv = running()
    submit(srv, "ana", "g1", [[2], [0], [1]], "sub-00000001", flags=[["unsafe"], [], []])
    submit(srv, "ben", "g1", [[2], [0], [1]], "sub-00000002")
    submit(srv, "ana", "g2", [[0], [1], [2]], "sub-00000003")
    submit(srv, "ben", "g2", [[1], [0], [2]], "sub-00000004")
    submit(srv, "ana", "g3", [[1], [0]], "sub-00000005")
    srv.stop()
    log = log_of(sheet)
    rows = lambda d: [json.loads(x) for x in (d / "rankings.jsonl").read_text().splitlines()]  # noqa: E731

    # majority: g1 (2 of 2 agree) and g3 (1 of 1) kept; g2 (1 of 2 each) dropped
    assert cli_main(["rank", "import", str(log), "--output_dir", str(tmp_path / "maj")]) == 0
    got = rows(tmp_path / "maj")
    assert [(r["group"], r["ranking"], r["annotators"]) for r in got] == [
        ("g1", [[2], [0], [1]], ["ana", "ben"]), ("g3", [[1], [0]], ["ana"])]  # fmt: skip
    assert got[0]["flags"] == [["unsafe"], [], []]
    from align.io import read_stage_info

    info = read_stage_info(tmp_path / "maj")
    assert info["metrics"]["dropped_no_majority"] == 1
    assert info["metrics"]["annotator_agreement"] == pytest.approx(5 / 6)
    assert info["labeler"]["kind"] == "human" and info["labeler"]["disagreement"] == "majority"

    # per_annotator: every ranking its own row
    assert cli_main(["rank", "import", str(log), "--output_dir", str(tmp_path / "per"),
                     "--disagreement", "per_annotator"]) == 0  # fmt: skip
    got = rows(tmp_path / "per")
    assert [(r["group"], r["annotator"]) for r in got] == [("g1", "ana"), ("g1", "ben"), ("g2", "ana"), ("g2", "ben"),
                                                           ("g3", "ana")]  # fmt: skip

    # the flag is for logs only
    assert cli_main(["rank", "import", str(sheet), "--output_dir", str(tmp_path / "x"), "--disagreement",
                     "majority"]) == 2  # fmt: skip
    assert "is a sheet (one ranking per row)" in capsys.readouterr().err


def test_serve_help_and_sources(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["rank", "serve", "--help"])
    assert e.value.code == 0 and "--annotations" in capsys.readouterr().out
    assert cli_main(["rank", "serve", str(tmp_path / "none.csv")]) == 2
    assert "no such file or dir" in capsys.readouterr().err
    write_sheet(tmp_path / "dup.jsonl", [GROUPS[0], GROUPS[0]])
    with pytest.raises(AlignError, match="id g1 repeats"):
        rank_serve.load_groups(tmp_path / "dup.jsonl")
    rank_dir = tmp_path / "rank"
    rank_dir.mkdir()
    row = {"prompt": "p", "responses": ["x", "y"], "ranking": [[0], [1]]}
    (rank_dir / "rankings.jsonl").write_text(json.dumps(row))
    assert rank_serve.resolve_source(rank_dir) == rank_dir / "rankings.jsonl"
    assert rank_serve.default_log(rank_dir) == rank_dir / "annotations.jsonl"
