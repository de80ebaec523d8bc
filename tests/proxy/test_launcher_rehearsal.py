"""The launcher's rehearsal (agent/proxy/warmup.py) and what it leaves for the forked proxies.

Each check runs in a fresh interpreter, as the launcher does: the rehearsal forks, and the
pytest process may have threads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]

# A TLS session through a forked proxy's own path (_prepare, then _run_child), after
# _preload, against the stand-in relay behind a real TLS listener.
SESSION = r"""
import json, os, ssl, sys, threading
import websockets.frames, websockets.http11, websockets.server, websockets.typing  # the stand-in's
from agent.proxy import launcher, warmup
launcher._preload()
before = set(sys.modules)
cert, key, ca = sys.argv[1:4]
server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server.load_cert_chain(cert, key)
relay, target = warmup._listener(), warmup._listener()
relay_port, target_port = relay.getsockname()[1], target.getsockname()[1]
results = []
stand_in = threading.Thread(
    target=lambda: results.append(
        warmup._stand_in(server.wrap_socket(relay, server_side=True), target)
    )
)
stand_in.start()
report_read, report_write = os.pipe()
lifeline_read, lifeline_write = os.pipe()
argv = ["-d", f"SSH={target_port}", "-e", f"localhost:{relay_port}",
        "-c", ca, "--report-fd", str(report_write)]
prepared = launcher._prepare(argv, ("an-access-token", None))
code = launcher._run_child(argv, ("an-access-token", None), prepared, lifeline_read)
stand_in.join(10)
report = os.read(report_read, 65536).decode()
print(json.dumps({"code": code, "prepared": prepared is not None, "stand_in": results,
                  "new_modules": sorted(set(sys.modules) - before), "report": report}))
"""

REHEARSAL = r"""
import json, os, sys, time
from agent.proxy import cli, launcher, warmup
if sys.argv[1] == "fail":
    warmup._LIMIT = 0.5
    warmup._stand_in = lambda relay, target: False
started = time.monotonic()
ok = warmup.rehearse(lambda stream: cli.setup_logging(4, stream))
took = time.monotonic() - started
try:
    os.waitpid(-1, os.WNOHANG)
    children = "some"
except ChildProcessError:
    children = "none"
log = "".join(h.stream.getvalue() for h in cli.log.handlers)
print(json.dumps({"ok": ok, "took": took, "threads": len(os.listdir("/proc/self/task")),
                  "children": children, "log": log}))
"""


def run_python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter from the repository; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def run_script(script: str, *args: str) -> tuple[dict[str, object], str]:
    """Run ``script``; its last stdout line (JSON) and its stderr."""
    done = run_python(script, *args)
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


@pytest.fixture(scope="module")
def relay_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from agent.emulator.pki import CertificateAuthority, KeyPair

    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory / "ca")
    pair = ca.issue_server(
        KeyPair(cert=directory / "relay.crt", key=directory / "relay.key"), hosts=["localhost"]
    )
    return pair.cert, pair.key, ca.cert_file


def test_a_forked_proxy_session_imports_nothing_the_launcher_did_not(relay_certificate):
    """What a child imports costs it private memory: _preload must leave nothing to import.

    The report module was once missing from the preload: each proxy paid 0.5 MB for it.
    """
    cert, key, ca = relay_certificate
    result, stderr = run_script(SESSION, str(cert), str(key), str(ca))
    assert result["prepared"] is True, stderr
    assert result["stand_in"] == [True], stderr  # handshake, stream both ways, reset, close
    assert result["code"] == 0, stderr
    assert result["new_modules"] == [], result["new_modules"]
    assert '"opened"' in result["report"] or "opened" in result["report"], result["report"]
    assert "rehearsal" not in stderr  # the launcher's preload rehearsed without complaint


def test_rehearsal_completes_and_leaves_one_thread_and_no_child():
    """Forking after a thread is unsafe: the rehearsal must leave the launcher as it found it."""
    result, _ = run_script(REHEARSAL, "ok")
    assert result["ok"] is True
    assert result["threads"] == 1
    assert result["children"] == "none"  # the stand-in is reaped
    assert "connected to the tunnel" in result["log"]
    assert "connection closed service=SSH" in result["log"]  # the stream ran to its reset
    assert "tunnel closed by the service code=1000" in result["log"]


def test_failed_rehearsal_is_bounded_and_reported_as_failed():
    """A stand-in that does nothing: the proxy retries until the limit, then gives up."""
    started = time.monotonic()
    result, _ = run_script(REHEARSAL, "fail")
    assert result["ok"] is False
    assert 0.4 < result["took"] < 5  # the 0.5 s limit, not the 5 s default or a hang
    assert result["threads"] == 1
    assert result["children"] == "none"
    assert time.monotonic() - started < 30


def test_launcher_survives_a_rehearsal_that_raises():
    """Best effort: a broken rehearsal is reported on stderr and the launcher goes on."""
    script = (
        "from agent.proxy import launcher, warmup\n"
        "def broken(setup):\n"
        "    raise OSError('no loopback')\n"
        "warmup.rehearse = broken\n"
        "launcher._preload()\n"
        "print(launcher._PARSER[0].prog)\n"
    )
    done = run_python(script)
    assert done.stdout.strip() == "tunnel-localproxy"
    assert "rehearsal failed: OSError('no loopback')" in done.stderr
    assert "proxies start cold" in done.stderr
