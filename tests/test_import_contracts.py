"""
The import contracts ([tool.importlinter] in pyproject.toml) hold; `lint-imports` catches a break.

A break is made in a copy of the package, so the real tree is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


ROOT = Path(__file__).parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONTRACTS: dict[str, str] = {
    contract["id"]: contract["name"]
    for contract in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
}


def lint_imports(root: Path) -> tuple[int, dict[str, str], str]:
    """
    Run `lint-imports` on the package under ``root``.

    Returns its status, each contract's verdict by id (KEPT or BROKEN) and its output.
    """
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", "pyproject.toml"],
        cwd=root,
        # The package is found on sys.path: ``root`` first, ahead of the editable install.
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    verdicts = {}
    for line in result.stdout.splitlines():
        for contract_id, name in CONTRACTS.items():
            if line in (f"{name} KEPT", f"{name} BROKEN"):
                verdicts[contract_id] = line.rsplit(" ", 1)[1]
    return result.returncode, verdicts, result.stdout + result.stderr


def test_the_tree_keeps_every_contract():
    """The real package keeps all contracts."""
    code, verdicts, output = lint_imports(ROOT)

    assert code == 0, output
    assert verdicts == dict.fromkeys(CONTRACTS, "KEPT"), output
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in output


@pytest.mark.parametrize(
    ("module", "statement", "broken", "chain"),
    [
        (
            "protocol/framing.py",
            "import agent.emulator",
            {"protocol-sans-io", "proxy-standalone"},  # the proxy reaches it through the protocol
            "agent.protocol.framing -> agent.emulator",
        ),
        (
            "protocol/tunnel.py",
            "import asyncio",
            {"protocol-sans-io"},
            "agent.protocol.tunnel -> asyncio",
        ),
        (
            "daemon/tunnels.py",
            "from agent.proxy import runner",
            {"daemon-device-only"},
            "agent.daemon.tunnels -> agent.proxy.runner",
        ),
        (
            "daemon/settings.py",
            "import boto3",
            {"daemon-device-only"},
            "agent.daemon.settings -> boto3",
        ),
        (
            "proxy/websocket.py",
            "import agent.notify",
            {"proxy-standalone"},
            "agent.proxy.websocket -> agent.notify",
        ),
        (
            "emulator/relay.py",
            "from agent.daemon import status",
            {"emulator-uses-device-parts-only"},
            "agent.emulator.relay -> agent.daemon.status",
        ),
        (
            "notify/base.py",
            "from agent.daemon import status",
            {"notify-below-daemon"},
            "agent.notify.base -> agent.daemon.status",
        ),
        (
            "common/retry.py",
            "import agent.logging",
            {"common-is-a-leaf"},
            "agent.common.retry -> agent.logging",
        ),
        # Indirect: everything that uses agent.common.retry now reaches the emulator too.
        (
            "common/retry.py",
            "import agent.emulator",
            {"common-is-a-leaf", "daemon-device-only", "proxy-standalone", "notify-below-daemon"},
            "agent.common.retry -> agent.emulator",
        ),
        (
            "ws/frames.py",
            "from agent.protocol import _pb",
            {"private-modules"},
            "agent.ws.frames -> agent.protocol._pb",
        ),
    ],
)
def test_a_bad_import_breaks_its_contract(tmp_path, module, statement, broken, chain):
    """One bad import fails `lint-imports`, naming the contracts it breaks and the import."""
    shutil.copytree(
        ROOT / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "agent" / module).open("a") as source:
        source.write(f"\n{statement}  # a deliberate break\n")

    code, verdicts, output = lint_imports(tmp_path)

    assert code == 1, output
    assert verdicts == {
        contract_id: "BROKEN" if contract_id in broken else "KEPT" for contract_id in CONTRACTS
    }, output
    assert chain in output
