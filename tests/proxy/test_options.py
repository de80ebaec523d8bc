"""
Tests for tunnel-localproxy's command line and environment handling.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.protocol import DESTINATION, SOURCE, ProtocolVersion
from agent.proxy.cli import UsageError, build_parser, options_from_args
from agent.proxy.mapping import Target
from agent.proxy.options import endpoint_for_region, parse_endpoint


TOKEN = "T" * 40
CT = "c" * 32


def options(argv, env=None):
    return options_from_args(build_parser().parse_args(argv), env or {})


class TestEndpoint:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("localhost:8443", ("localhost", 8443)),
            ("Data.Example.COM", ("data.example.com", 443)),
            ("[::1]:9000", ("::1", 9000)),
            ("127.0.0.1", ("127.0.0.1", 443)),
        ],
    )
    def test_forms(self, value, expected):
        """host[:port] parses, lowercased, default port 443."""
        assert parse_endpoint(value) == expected

    @pytest.mark.parametrize("value", ["", "https://x", "a:b", "x:0", "x:99999", "a b"])
    def test_bad_endpoints(self, value):
        """Schemes, bad ports and odd characters are refused."""
        with pytest.raises(ValueError):
            parse_endpoint(value)

    def test_region_endpoints(self):
        """Regions map to the data-plane host, China with .com.cn."""
        assert endpoint_for_region("eu-west-1") == (
            "data.tunneling.iot.eu-west-1.amazonaws.com",
            443,
        )
        assert endpoint_for_region("cn-north-1")[0].endswith(".amazonaws.com.cn")
        with pytest.raises(ValueError):
            endpoint_for_region("evil.com/")


class TestOptions:
    def test_destination_from_environment(self):
        """Token and client token come from the environment; -d selects the destination."""
        opts = options(
            ["-r", "us-east-1", "-d", "SSH=22"],
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN, "AWSIOT_TUNNEL_CLIENT_TOKEN": CT},
        )

        assert opts.mode is DESTINATION
        assert opts.targets == {"SSH": Target(port=22)}
        assert (opts.token, opts.client_token) == (TOKEN, CT)
        assert opts.host == "data.tunneling.iot.us-east-1.amazonaws.com"
        assert TOKEN not in repr(opts)

    def test_source_with_version_and_bind(self):
        """-s, -y V2, -b and -k are honoured."""
        opts = options(
            ["-e", "localhost:9", "-s", "5555", "-y", "v2", "-b", "0.0.0.0", "-k"],
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN},
        )

        assert opts.mode is SOURCE
        assert opts.version is ProtocolVersion.V2
        assert (opts.bind_address, opts.verify, opts.port) == ("0.0.0.0", False, 9)

    def test_flag_token_beats_environment(self):
        """-t wins over the environment, as in the AWS localproxy."""
        opts = options(["-e", "h", "-d", "22", "-t", "FLAG"], {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN})

        assert opts.token == "FLAG"

    def test_config_file(self, tmp_path):
        """--config supplies long options as name = value lines."""
        config = tmp_path / "proxy.ini"
        config.write_text("# comment\naccess-token = FROMFILE\nregion = eu-west-1\n")

        opts = options(["--config", str(config), "-d", "22"])

        assert opts.token == "FROMFILE"
        assert opts.host.endswith("eu-west-1.amazonaws.com")

    @pytest.mark.parametrize(
        ("argv", "env", "message"),
        [
            (["-r", "us-east-1", "-d", "22"], {}, "no access token"),
            (["-d", "22"], {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN}, "no endpoint"),
            (["-r", "x", "-e", "h", "-d", "22"], {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN}, "either"),
            (
                ["-r", "us-east-1", "-s", "1", "-d", "2"],
                {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN},
                "exclusive",
            ),
            (["-r", "us-east-1"], {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN}, "give -s MAP"),
            (
                ["-r", "x", "-d", "22", "-i", "short"],
                {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN},
                "client token",
            ),
            (
                ["-r", "us-east-1", "-d", "S:1=22"],
                {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN},
                "service id",
            ),
            (["-r", "x", "-d", "22"], {"AWSIOT_TUNNEL_ACCESS_TOKEN": "a\nb"}, "malformed"),
        ],
    )
    def test_usage_errors_are_clear(self, argv, env, message):
        """Each invalid combination names what is wrong."""
        with pytest.raises(UsageError, match=message):
            options(argv, env)


class TestCommand:
    def test_help_and_version_exit_0(self):
        """--help explains the flags and --version prints the version."""
        help_ = subprocess.run(
            [sys.executable, "-m", "agent.proxy", "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        version = subprocess.run(
            [sys.executable, "-m", "agent.proxy", "--version"],
            capture_output=True,
            text=True,
            check=False,
        )

        assert help_.returncode == 0
        assert "AWSIOT_TUNNEL_ACCESS_TOKEN" in help_.stdout
        assert "--destination-app" in help_.stdout
        assert version.returncode == 0
        assert version.stdout.startswith("tunnel-localproxy ")

    def test_usage_error_exits_2_with_one_line(self):
        """A missing token is one line on stderr and exit status 2."""
        result = subprocess.run(
            [sys.executable, "-m", "agent.proxy", "-r", "us-east-1", "-d", "22"],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
            check=False,
        )

        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "tunnel-localproxy: no access token: set AWSIOT_TUNNEL_ACCESS_TOKEN"
        ]


class TestFootprint:
    def test_running_proxy_loads_neither_protobuf_nor_importlib_metadata(self):
        """The proxy's imports leave out protobuf and the email package (memory budget)."""
        code = (
            "import sys\n"
            "from agent.proxy.cli import defer_unused_imports\n"
            "defer_unused_imports()\n"
            "import agent.proxy.runner\n"
            "print(sorted(m for m in ('google.protobuf', 'email', 'csv') if m in sys.modules))\n"
            "import importlib.metadata\n"
            "print(importlib.metadata.version('websockets') != '')\n"
        )

        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )

        assert result.stdout.split("\n")[:2] == ["[]", "True"]


class TestClientTokenVariables:
    def test_the_aws_binarys_variable_name_is_read_too(self):
        """AWSIOT_CLIENT_TOKEN, the AWS localproxy's name, works like AWSIOT_TUNNEL_CLIENT_TOKEN."""
        client = "c" * 40
        env = {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN, "AWSIOT_CLIENT_TOKEN": client}

        opts = options_from_args(build_parser().parse_args(["-r", "us-east-1", "-d", "22"]), env)

        assert opts.client_token == client
