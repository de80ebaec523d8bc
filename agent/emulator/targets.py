"""
Local services a tunnel can reach in tests and the demo: OpenSSH's sshd and a small web server.

Both listen on 127.0.0.1 only, on a free port, with generated keys; nothing is installed or changed
outside the directory given.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, ClassVar

from agent.emulator.broker import free_port


if TYPE_CHECKING:
    from pathlib import Path


__all__ = ["Sshd", "WebServer", "stop_process"]

SSHD = "/usr/sbin/sshd"


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """
    SIGTERM a child, SIGKILL it if it is still there after ``grace`` seconds, and reap it.

    Returns:
        Its exit status.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class Sshd:
    """
    OpenSSH's sshd on a loopback port, with a generated host key and one authorised user key.

    Raises:
        RuntimeError: If sshd is not installed or does not start.
    """

    def __init__(self, directory: Path) -> None:
        """
        Generate keys and a config in ``directory`` and start sshd in the foreground (``-D``).
        """
        if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:  # noqa: PTH110
            raise RuntimeError("sshd not found: install openssh-server (make deps does)")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.host_key = directory / "host_ed25519"
        self.user_key = directory / "id_ed25519"
        for key in (self.host_key, self.user_key):
            if not key.exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],  # noqa: S607
                    check=True,
                )
        authorized = directory / "authorized_keys"
        authorized.write_bytes(self.user_key.with_suffix(".pub").read_bytes())
        authorized.chmod(0o600)
        self.port = free_port()
        self.user = "root" if os.geteuid() == 0 else getpass.getuser()
        if os.geteuid() == 0:
            # sshd's privilege separation directory; absent on a machine that never ran sshd.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # noqa: PTH103
        config = directory / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {authorized}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            f"PidFile {directory / 'sshd.pid'}\nStrictModes no\nUsePAM no\n"
            "Subsystem sftp internal-sftp\n"
        )
        self.log = directory / "sshd.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sshd did not start: {self.log.read_text()}")

    def ssh_options(self, port: int) -> list[str]:
        """
        Options for ssh to log in through ``port`` with the generated key, non-interactively.
        """
        return [
            "-i", str(self.user_key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-p", str(port),
        ]  # fmt: skip

    def scp_options(self, port: int) -> list[str]:
        """
        The same for scp, which spells the port ``-P``.
        """
        return [*self.ssh_options(port)[:-2], "-P", str(port)]

    def stop(self) -> None:
        """
        Stop sshd.
        """
        stop_process(self.proc)


class WebServer:
    """
    An HTTP server on a loopback port serving one page.
    """

    page: ClassVar[bytes] = b""

    def __init__(self, page: bytes) -> None:
        """
        Start serving ``page`` at every path.
        """
        body = page

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                """
                Quiet: the demo prints its own timeline.
                """

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """
        Stop serving.
        """
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
