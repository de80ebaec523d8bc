"""Same-page merging (agent/common/process.py): the kernel requests and the ksmd state.

Each request runs in a fresh interpreter: it changes the process for good.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.common import process


ROOT = Path(__file__).resolve().parents[2]

OFFER = r"""
import json, sys
from agent.common import process
if sys.argv[1] == "old-kernel":
    process._prctl = lambda *args: -1  # PR_SET_MEMORY_MERGE is unknown before Linux 6.4
how = process.share_identical_pages()
stat = dict(line.split(None, 1) for line in open("/proc/self/ksm_stat").read().splitlines())
flags = {}
mapping = None
for line in open("/proc/self/smaps"):
    fields = line.split()
    if "-" in fields[0] and ":" not in fields[0]:
        mapping = fields[5] if len(fields) > 5 else "[anon]"
    elif fields[0] == "VmFlags:":
        flags.setdefault(mapping, set()).update(fields[1:])
print(json.dumps({"how": how, "merge_any": stat.get("ksm_merge_any:", "").strip(),
                  "heap_mergeable": "mg" in flags.get("[heap]", set()),
                  "stack_mergeable": "mg" in flags.get("[stack]", set())}))
"""


def offer(kernel: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", OFFER, kernel],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout)


def test_whole_process_is_offered_where_the_kernel_can():
    """Linux 6.4+ (this machine): one prctl covers every mapping, present and future."""
    result = offer("this-kernel")
    assert result["how"] == "process"
    assert result["merge_any"] == "yes"


def test_older_kernels_get_each_private_writable_mapping_offered():
    """Before 6.4: MADV_MERGEABLE on the mappings there are, the heap among them."""
    result = offer("old-kernel")
    assert result["how"] == "mappings"
    assert result["merge_any"] == "no"
    assert result["heap_mergeable"] is True
    assert result["stack_mergeable"] is False


@pytest.mark.parametrize(
    ("content", "state"),
    [("1\n", "running"), ("0\n", "stopped"), ("2\n", "stopped"), (None, "absent")],
)
def test_ksm_state_reads_the_run_file(tmp_path, monkeypatch, content, state):
    run = tmp_path / "run"
    if content is not None:
        run.write_text(content)
    monkeypatch.setattr(process, "_KSM_RUN", str(run))
    assert process.ksm_state() == state
