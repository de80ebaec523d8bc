"""The token pipe: what the agent writes, the proxy reads, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agent.common.secretpipe import (
    MAX_DOCUMENT,
    TokenPipeError,
    decode_tokens,
    read_tokens,
    token_pipe,
)


TOKEN = "T" * 300
CLIENT = "c-" + "x" * 40


def test_round_trip_closes_the_descriptor():
    fd = token_pipe(TOKEN, CLIENT)

    assert read_tokens(fd) == (TOKEN, CLIENT)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_no_client_token():
    assert read_tokens(token_pipe(TOKEN, None)) == (TOKEN, None)


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"[1]", b'{"access_token": 3}', b'{"client_token": "x"}']
)
def test_malformed_documents_are_refused(data):
    with pytest.raises(TokenPipeError):
        decode_tokens(data)


def test_too_large_is_refused_on_both_sides():
    with pytest.raises(TokenPipeError):
        token_pipe("x" * MAX_DOCUMENT, None)
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * (MAX_DOCUMENT + 1))
    os.close(write_end)
    with pytest.raises(TokenPipeError, match="too large"):
        read_tokens(read_end)


def test_the_proxy_takes_its_tokens_from_the_pipe_not_its_environment():
    """tunnel-localproxy --token-fd N: the tokens reach its options; its environment has none."""
    fd = token_pipe(TOKEN, CLIENT)
    code = (
        "import os, sys\n"
        "from agent.proxy.cli import build_parser, environment_with_tokens, options_from_args\n"
        "args = build_parser().parse_args(sys.argv[1:])\n"
        "options = options_from_args(args, environment_with_tokens(args))\n"
        "print(options.token, options.client_token)\n"
        "print(any('AWSIOT' in k for k in os.environ))\n"
        "print(open('/proc/self/environ', 'rb').read().count(b'TTTT'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT")}
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, "-d", "22", "-r", "us-east-1", "--token-fd", str(fd)],
            pass_fds=(fd,),
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.close(fd)

    assert result.stdout.split() == [TOKEN, CLIENT, "False", "0"]


def test_an_unreadable_token_fd_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "agent.proxy", "-d", "22", "-r", "us-east-1", "--token-fd", "97"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 2  # EXIT_USAGE
    assert "token descriptor" in result.stderr
