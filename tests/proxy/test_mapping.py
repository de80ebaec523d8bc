"""
Tests for the -s/-d service maps of the local proxy.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from agent.proxy.mapping import (
    MappingError,
    Target,
    match_services,
    parse_destination_map,
    parse_source_map,
)


class TestSourceMap:
    def test_lone_port_is_the_unnamed_mapping(self):
        """A bare port maps the tunnel's single service."""
        assert parse_source_map("5555") == {"": 5555}

    def test_named_ports(self):
        """SSH1=5555,SSH2=6666 maps two services; port 0 means pick one."""
        assert parse_source_map("SSH1=5555, SSH2=0") == {"SSH1": 5555, "SSH2": 0}

    def test_duplicates_keep_the_first(self):
        """The AWS localproxy ignores a repeated service id."""
        assert parse_source_map("A=1,A=2") == {"A": 1}

    @pytest.mark.parametrize("spec", ["", "x", "A=70000", "A:B=1", "A=1,2", "A=-1", "=5"])
    def test_malformed_maps_are_refused(self, spec):
        """Bad ports, ids with ':' and unnamed entries among named ones are errors."""
        with pytest.raises(MappingError):
            parse_source_map(spec)


class TestDestinationMap:
    def test_forms(self):
        """Port, host:port, IPv6 and Unix socket paths are all accepted."""
        assert parse_destination_map("SSH=22,WEB=10.0.0.1:80,V6=[::1]:8080,SOCK=/run/app.sock") == {
            "SSH": Target(port=22),
            "WEB": Target(host="10.0.0.1", port=80),
            "V6": Target(host="::1", port=8080),
            "SOCK": Target(path="/run/app.sock"),
        }

    def test_port_zero_is_not_a_destination(self):
        """A destination must name a real port."""
        with pytest.raises(MappingError):
            parse_destination_map("SSH=0")

    def test_str_renders_the_flag_form(self):
        """Targets print as host:port or the socket path."""
        assert [str(t) for t in parse_destination_map("A=22,B=/tmp/s").values()] == [
            "127.0.0.1:22",
            "/tmp/s",
        ]


class TestMatchServices:
    def test_unnamed_mapping_takes_the_only_service_name(self):
        """A single unnamed mapping is renamed to the tunnel's only service."""
        assert match_services({"": 22}, ("SSH",)) == {"SSH": 22}

    def test_unnamed_mapping_with_several_services_is_an_error(self):
        """One unnamed mapping cannot serve a tunnel of two services."""
        with pytest.raises(MappingError, match="2 services"):
            match_services({"": 22}, ("SSH", "VNC"))

    def test_missing_service_is_named(self):
        """The error names the service the map lacks."""
        with pytest.raises(MappingError, match="VNC"):
            match_services({"SSH": 22}, ("SSH", "VNC"))

    def test_extra_mappings_are_dropped(self):
        """Mappings the tunnel does not announce are not used."""
        assert match_services({"SSH": 22, "X": 1}, ("SSH",)) == {"SSH": 22}

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=60))
    def test_fuzzed_maps_raise_only_mapping_errors(self, spec):
        """Arbitrary text either parses or raises MappingError."""
        for parse in (parse_source_map, parse_destination_map):
            try:
                parsed = parse(spec)
            except MappingError:
                continue
            assert parsed
