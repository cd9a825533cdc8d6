"""A headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`): no Python package,
no driver binary, no port. The `chromium` fixture skips without a binary, except under CI=true, where it fails
(.ci/run installs chromium)."""

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

TIMEOUT = 20.0  # seconds for any one browser step or wait


def chromium_path() -> str | None:
    for name in (os.environ.get("ALIGN_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but no chromium on PATH: .ci/run installs it (apt-get install -y chromium).")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; or set ALIGN_CHROMIUM)")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# A minimal DevTools client over a pipe: fd 3 carries our commands, fd 4 Chromium's answers, each JSON ending in NUL.


class Browser:
    def __init__(self, binary: str, profile: Path):
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def fds() -> None:  # in the child: the pipe ends at the fds Chromium reads and writes
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1100,700",
                "--force-device-scale-factor=1", "--hide-scrollbars", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_child)
        os.close(from_child)
        self._buf = b""
        self._id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._r], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method} in {TIMEOUT} s")
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # events have no id: ignored
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._w)
        os.close(self._r)


class Tab:
    def __init__(self, browser: Browser, url: str):
        self.b = browser
        self.target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": self.target, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete'")

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.b.send(method, params, self.session)

    def close(self) -> None:
        self.b.send("Target.closeTarget", {"targetId": self.target})

    def eval(self, expr: str):
        got = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in got:
            raise RuntimeError(f"{expr}: {got['exceptionDetails']}")
        return got["result"].get("value")

    def wait(self, expr: str, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expr)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout} s for {expr}")

    def center(self, selector: str) -> tuple[float, float]:
        js = (
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
            "return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        x, y = self.eval(js)
        return x, y

    def mouse(self, kind: str, x: float, y: float) -> None:
        params = {"type": kind, "x": x, "y": y, "button": "left", "buttons": 1 if kind != "mouseReleased" else 0}
        if kind != "mouseMoved":
            params["clickCount"] = 1
        self.send("Input.dispatchMouseEvent", params)

    def click(self, selector: str) -> None:
        x, y = self.center(selector)
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def drag(self, selector: str, to_selector: str, above: bool = True) -> None:
        """Press on `selector`, move in steps to just above (or below) `to_selector`'s card, release."""
        x, y = self.center(selector)
        box = self.eval(f"(() => {{ const r = document.querySelector({json.dumps(to_selector)})"
                        ".getBoundingClientRect(); return [r.top, r.bottom]; })()")  # fmt: skip
        ty = box[0] + 5 if above else box[1] - 5
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        self.mouse("mousePressed", x, y)
        for n in range(1, 9):
            self.mouse("mouseMoved", x, y + (ty - y) * n / 8)
        self.mouse("mouseReleased", x, ty)

    KEYS = {"ArrowUp": (38, "ArrowUp", ""), "ArrowDown": (40, "ArrowDown", ""), "Enter": (13, "Enter", "\r"),
            "=": (187, "Equal", "="), "s": (83, "KeyS", "s"), "u": (85, "KeyU", "u")}  # fmt: skip

    def key(self, key: str, shift: bool = False) -> None:
        code, name, text = self.KEYS[key]
        common = {"key": key, "code": name, "windowsVirtualKeyCode": code, "modifiers": 8 if shift else 0}
        self.send("Input.dispatchKeyEvent", {"type": "keyDown", **common, **({"text": text} if text else {})})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **common})

    def text(self, selector: str) -> str:
        return self.eval(f"document.querySelector({json.dumps(selector)}).textContent")

    def order(self) -> list[int]:
        return self.eval("Array.from(document.querySelectorAll('#cards .card'), c => +c.dataset.response)")
