"""The shadow reporter's coalescing and its handling of a refused publish; the report's contents."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.daemon.notification import requested_services
from agent.daemon.report import Health, Rejection, ShadowReporter, reported_document
from agent.daemon.tunnels import Limits, TunnelInfo
from agent.notify.base import PublishResult


class Recorder:
    def __init__(self, result: PublishResult | None = None) -> None:
        self.sent: list[tuple[float, dict]] = []
        self.result = result or PublishResult(ok=True)

    async def __call__(self, topic: str, payload: bytes) -> PublishResult:
        assert topic == "$aws/things/t/shadow/name/tunnel-agent/update"
        self.sent.append((asyncio.get_running_loop().time(), json.loads(payload)))
        return self.result


TOPIC = "$aws/things/t/shadow/name/tunnel-agent/update"


@pytest.mark.asyncio
async def test_coalesces_to_one_per_interval_and_skips_unchanged():
    """Ten changes in a burst: the first at once, then only the latest a second later."""
    publish = Recorder()
    reporter = ShadowReporter(publish, topic=TOPIC, interval=0.2)
    for n in range(10):
        reporter.update({"n": n})
        await asyncio.sleep(0)
    await asyncio.sleep(0.35)
    reporter.update({"n": 9})  # unchanged since the last publish: nothing sent
    await asyncio.sleep(0.3)
    await reporter.close()

    values = [doc["state"]["reported"]["n"] for _, doc in publish.sent]
    assert values == [0, 9]
    assert publish.sent[1][0] - publish.sent[0][0] >= 0.19


@pytest.mark.asyncio
async def test_refused_publish_logged_once(caplog, capsys):
    """A policy refusal (135) is logged once however many reports follow."""
    publish = Recorder(PublishResult(ok=False, reason="NOT_AUTHORIZED", refused=True))
    reporter = ShadowReporter(publish, topic=TOPIC, interval=0.01)
    for n in range(3):
        reporter.update({"n": n})
        await asyncio.sleep(0.05)
    await reporter.close({"state": "offline"})
    out = capsys.readouterr().out + caplog.text

    assert len(publish.sent) == 4
    assert out.count("shadow_report_refused") == 1


def test_report_names_no_token_and_no_nulls_in_arrays():
    token = "AQGAAXi" + "x" * 300
    health = Health(rejection=Rejection(1.0, "services[0] is not in the services map", ("VNC",)))
    tunnel = TunnelInfo(
        key="k", services=("SSH",), region="us-east-1", state="running", pid=5, started_at=2.0,
        restarts=0, superseded=False, connected=True, connections=1, bytes_in=2, bytes_out=3,
    )  # fmt: skip
    document = reported_document(
        version="1", state="running", started_at=0.0, health=health, services=["SSH"],
        limits=Limits(), tunnels=[tunnel],
    )  # fmt: skip

    assert document["tunnels"] == [
        {"key": "k", "services": ["SSH"], "since": 2.0, "connected": True, "connections": 1,
         "bytes_in": 2, "bytes_out": 3, "restarts": 0}
    ]  # fmt: skip
    assert document["last_rejection"]["services"] == ["VNC"]
    assert token not in json.dumps(document)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"services": ["SSH", "VNC"]}', (("SSH", "VNC"), None)),
        (b'{"services": ["AQGAAX:secret", "x"]}', (None, 2)),
        (b'{"services": "SSH"}', (None, None)),
        (b"not json", (None, None)),
    ],
)
def test_requested_services_only_names_well_formed_ids(payload, expected):
    assert requested_services(payload) == expected
