"""`align rank serve` in a real headless Chromium: an annotator ranks 5 groups by mouse and keyboard (ties, a flag, a
skip, an undo), the server is killed with -9 mid-way and restarted, the tab is closed and reopened; the log then holds
every submission exactly once, and its import trains `align reward`.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`): no Python package, no driver
binary, no port. Without a chromium binary the test skips, except under CI=true, where it fails (.ci/run installs
chromium). ALIGN_RANK_SCREENSHOT=docs/rank_serve.png saves the page mid-way (how the README's screenshot was made).
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from browser import Browser, Tab  # tests/ is on sys.path; the `chromium` fixture is in conftest.py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SHOWN = "!document.getElementById('task').hidden && document.getElementById('gid').textContent === '%s'"


# ---------------------------------------------------------------------------------------------------------------------
# The sheet, the server, the reward model


GROUPS = [
    ("name three red things", ["a red apple , a red car , a red sun", "the sky is blue", "red , red and red"]),
    ("say one kind word", ["kind", "you are kind and the dog is kind", "no"]),
    ("write **bold** text", ["**bold** text", "<b>html</b> <script>window.ran = 1</script>", "```\ncode\n```"]),
    ("count to three", ["one two three", "one two", "three two one"]),
    ("name a green thing", ["grass is green", "a green cat " * 200, "the sun"]),  # a long one: its card scrolls
]


def write_sheet(path: Path) -> Path:
    rows = [{"id": n, "prompt": p, **{f"response_{i}": r for i, r in enumerate(rs)}, "ranking": ""}
            for n, (p, rs) in enumerate(GROUPS, 1)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(sheet: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "align", "rank", "serve", str(sheet), "--port", str(port),
                             "--max_requests", "2000"], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state?annotator=probe", timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode()
                raise RuntimeError(f"align rank serve exited {proc.returncode}: {err}") from None
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError("align rank serve did not start in 60 s")


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rank_five_groups_in_chromium_kill_restart_import_and_train(chromium, tmp_path):
    start = time.monotonic()
    sheet = write_sheet(tmp_path / "sheet.jsonl")
    log = Path(str(sheet) + ".annotations.jsonl")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = start_server(sheet, port)
    browser = Browser(chromium, Path(tempfile.mkdtemp(dir=tmp_path)))
    try:
        # bob ranked groups 1 and 2 earlier (through the API the page uses): 2 > 0 > 1, and 1 > 2 > 0
        for group, ranking in (("1", [[2], [0], [1]]), ("2", [[1], [2], [0]])):
            post(port, "/api/submit", {"annotator": "bob", "group": group, "ranking": ranking,
                                       "submission": f"bob-group-{group}"})  # fmt: skip

        tab = Tab(browser, url)
        tab.wait("!document.getElementById('login').hidden")
        tab.click("#name")
        tab.send("Input.insertText", {"text": "alice"})
        tab.key("Enter")
        tab.wait(SHOWN % "1")

        # Group 1, by mouse: drag response 2 above response 0; submit with the button
        tab.drag('.card[data-response="2"] .card-head', '.card[data-response="0"]')
        assert tab.order() == [2, 0, 1]
        tab.click("#submit")
        tab.wait(SHOWN % "2")
        assert "agreement: 100.0 %" in tab.text("#agreement")  # alice and bob agree on group 1: 3 of 3 pairs

        # Group 2, by mouse, with a tie: response 1 to the top, then tie 0 = 2 at the sign between them; flag 2 unsafe
        tab.drag('.card[data-response="1"] .card-head', '.card[data-response="0"]')
        assert tab.order() == [1, 0, 2]
        tab.click('.sep button[data-pos="1"]')
        tab.click('.card[data-response="2"] input[data-flag="unsafe"]')
        if os.environ.get("ALIGN_RANK_SCREENSHOT"):
            shot = tab.send("Page.captureScreenshot", {"format": "png"})["data"]
            Path(os.environ["ALIGN_RANK_SCREENSHOT"]).write_bytes(base64.b64decode(shot))
        tab.click("#submit")
        tab.wait("document.getElementById('progress').textContent.startsWith('2 of 5')")

        # Group 3 is shown as text: no element from its markup, no script ran
        assert tab.text("#prompt") == GROUPS[2][0]
        assert tab.text('.card[data-response="1"] pre') == GROUPS[2][1][1]
        assert tab.eval("document.querySelectorAll('#cards b, #cards script').length === 0 && !window.ran")

        # The server dies (kill -9) between two submissions
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        lines_before = log.read_bytes()

        # Group 3, by keyboard: select response 1, move it up; select response 2 (now last), move it up: 1 > 2 > 0
        tab.key("ArrowDown")
        tab.key("ArrowUp", shift=True)
        tab.key("ArrowDown")
        tab.key("ArrowDown")
        tab.key("ArrowUp", shift=True)
        assert tab.order() == [1, 2, 0]
        tab.key("Enter")  # the server is down: nothing saved, the page says so and keeps the ranking
        tab.wait("document.getElementById('status').textContent.includes('cannot be reached')")
        assert log.read_bytes() == lines_before and tab.order() == [1, 2, 0]

        server = start_server(sheet, port)
        tab.key("Enter")  # the same submission again, now saved
        tab.wait(SHOWN % "4")

        # Close the tab, open a new one: it resumes at group 4 (the name is remembered, the progress is the server's)
        tab.close()
        tab = Tab(browser, url)
        tab.wait(SHOWN % "4")
        assert tab.text("#progress").startswith("3 of 5")

        # Group 4: skip it (S); group 5 comes first: Shift+Down moves response 0 below 1: 1 > 0 > 2
        tab.key("s")
        tab.wait(SHOWN % "5")
        assert tab.eval("(e => e.scrollHeight > e.clientHeight)(document.querySelector('[data-response=\"1\"] pre'))")
        tab.key("ArrowDown", shift=True)
        assert tab.order() == [1, 0, 2]
        tab.key("Enter")
        # Group 4 comes back; tie 0 = 1 with "=", submit: all done
        tab.wait(SHOWN % "4")
        tab.key("=")
        tab.key("Enter")
        tab.wait("!document.getElementById('done').hidden")
        # Undo (U): group 4 is back with its ranking 0 = 1 > 2; untie, tie 1 = 2 instead: 0 > 1 = 2, submit
        tab.key("u")
        tab.wait(SHOWN % "4")
        assert tab.eval("Array.from(document.querySelectorAll('.sep button'), b => b.textContent)") == [
            "= tied", "> better than"]  # fmt: skip
        tab.key("=")
        tab.key("ArrowDown")
        tab.key("=")
        tab.key("Enter")
        tab.wait("!document.getElementById('done').hidden")
        # alice and bob: group 1 agrees on 3 of 3 pairs; group 2, alice 1 > 0 = 2, bob 1 > 2 > 0: (0,1) agree,
        # (1,2) agree, (0,2) a tie against an order, 1/2. (3 + 2.5) / 6 = 91.7 %
        assert "agreement: 91.7 % (6 comparisons, 2 groups)" in tab.text("#agreement")
    finally:
        browser.close()
        server.kill()
        server.wait(10)

    # The log: every submission exactly once
    records = log_lines(log)
    submits = [r for r in records if r["kind"] == "submit"]
    undos = [r for r in records if r["kind"] == "undo"]
    assert len({r["id"] for r in submits}) == len(submits)  # no id written twice (the retried group 3 included)
    assert [(r["annotator"], r["group"]) for r in undos] == [("alice", "4")]
    active = [r for r in submits if r["id"] not in {u["id"] for u in undos}]
    assert sorted((r["annotator"], r["group"]) for r in active) == [
        ("alice", "1"),
        ("alice", "2"),
        ("alice", "3"),
        ("alice", "4"),
        ("alice", "5"),
        ("bob", "1"),
        ("bob", "2"),
    ]
    got = {r["group"]: r["ranking"] for r in active if r["annotator"] == "alice"}
    assert got == {"1": [[2], [0], [1]], "2": [[1], [0, 2]], "3": [[1], [2], [0]], "4": [[0], [1, 2]],
                   "5": [[1], [0], [2]]}  # fmt: skip
    assert next(r for r in active if r["group"] == "2" and r["annotator"] == "alice")["flags"] == [[], [], ["unsafe"]]
    assert [r["group"] for r in records if r["kind"] == "skip"] == ["4"]

    # Import (majority: group 2's two rankings differ, so it is dropped) and train the reward model on it
    from align.cli import main as cli_main
    from align.io import read_stage_info

    out = tmp_path / "rank_human"
    assert cli_main(["rank", "import", str(log), "--output_dir", str(out)]) == 0
    info = read_stage_info(out)
    assert info["metrics"]["num_groups"] == 4 and info["metrics"]["dropped_no_majority"] == 1
    assert info["metrics"]["annotator_agreement"] == pytest.approx(5.5 / 6)
    reward = train_reward(tmp_path, out)
    assert read_stage_info(reward)["stage"] == "reward"
    assert time.monotonic() - start < 120


def train_reward(tmp_path: Path, data: Path) -> Path:
    """A tiny untrained llama "sft" stage over the sheet's words, then `align reward` on `data` (seconds)."""
    import torch
    from tiny_stages import save_stage, tiny_policy

    from align.config import parse_config
    from align.models import modeling
    from align.stages.reward import run

    words = sorted({w for p, rs in GROUPS for t in [p, *rs] for w in t.split()})
    tok = modeling.wordlevel_tokenizer(words)
    modeling.ensure_chat_template(tok)
    torch.manual_seed(0)
    sizes = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    sft = save_stage(tmp_path / "sft", tiny_policy(tok, sizes), tok, "sft")
    cfg = parse_config("reward", [], overrides={
        "model_name_or_path": str(sft), "dataset_name": str(data), "output_dir": str(tmp_path / "reward"),
        "dataset_test_size": 0.25, "max_length": 96, "num_train_epochs": 2, "per_device_train_batch_size": 2,
        "learning_rate": 1e-3, "save_strategy": "no", "bf16": False, "use_cpu": True, "report_to": "none",
        "disable_tqdm": True, "seed": 0})  # fmt: skip
    return run(cfg)
