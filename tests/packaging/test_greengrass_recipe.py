"""
The Greengrass component: recipe format, access control, and its lifecycle scripts.

The nucleus cannot run here, so the tests apply its recipe-variable rules themselves
(``interpolate`` below, after the recipe reference: a value node becomes its text, an
object node its compact JSON, a missing node stays as written) and run the resulting
Install and Run scripts with ``sh``, as the nucleus does on Linux.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings, strategies as st

import agent


REPO = Path(__file__).resolve().parents[2]
GREENGRASS = REPO / "packaging" / "greengrass"
RECIPE = GREENGRASS / "recipe.yaml"
RENDER = GREENGRASS / "render_config.py"
SCALE = float(os.environ.get("TEST_TIME_SCALE", "1.0"))
THING = "gg-core-7"
NOTIFY_TOPIC = "$aws/things/{iot:thingName}/tunnels/notify"

# The recipe format (recipe reference, "Recipe format").
TOP_LEVEL_KEYS = {
    "RecipeFormatVersion", "ComponentName", "ComponentVersion", "ComponentDescription",
    "ComponentPublisher", "ComponentConfiguration", "ComponentDependencies", "ComponentType",
    "ComponentSource", "Manifests", "Lifecycle",
}  # fmt: skip
REQUIRED_KEYS = {"RecipeFormatVersion", "ComponentName", "ComponentVersion", "Manifests"}
LIFECYCLE_STEPS = {"Setenv", "Bootstrap", "Install", "Run", "Startup", "Shutdown", "Recover"}
STEP_KEYS = {"Script", "RequiresPrivilege", "Skipif", "Timeout", "Setenv"}
SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?"
)
VARIABLE = re.compile(r"\{([A-Za-z]+):([^{}]*)\}")


def load_recipe() -> dict[str, Any]:
    return yaml.safe_load(RECIPE.read_text())


def manifest() -> dict[str, Any]:
    (only,) = load_recipe()["Manifests"]
    return only


def default_configuration() -> dict[str, Any]:
    return load_recipe()["ComponentConfiguration"]["DefaultConfiguration"]


def resolve_pointer(document: Any, pointer: str) -> Any:
    """Follow an RFC 6901 JSON pointer; KeyError when it points nowhere."""
    node = document
    for token in pointer.split("/")[1:]:
        key = token.replace("~1", "/").replace("~0", "~")
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def interpolate(text: str, *, configuration: dict[str, Any], work: Path, artifacts: Path) -> str:
    """Replace recipe variables as the nucleus does for this component's lifecycle."""
    system = {
        ("artifacts", "path"): str(artifacts),
        ("work", "path"): str(work),
        ("iot", "thingName"): THING,
    }

    def replace(match: re.Match[str]) -> str:
        namespace, key = match.groups()
        if namespace == "configuration":
            try:
                node = resolve_pointer(configuration, key)
            except (KeyError, IndexError, ValueError):
                return match.group()
            if isinstance(node, dict | list):
                return json.dumps(node, separators=(",", ":"), ensure_ascii=False)
            return (
                "null"
                if node is None
                else str(node).lower()
                if isinstance(node, bool)
                else str(node)
            )
        return system.get((namespace, key), match.group())

    return VARIABLE.sub(replace, text)


def lifecycle_strings() -> list[str]:
    """Every string under the manifest's Lifecycle (the nucleus interpolates all of them)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(manifest()["Lifecycle"])
    return found


class TestRecipeFormat:
    def test_is_yaml_with_the_recipe_format_keys(self):
        """The recipe is YAML with the required keys and only keys the format defines."""
        recipe = load_recipe()

        assert REQUIRED_KEYS <= set(recipe) <= TOP_LEVEL_KEYS
        # Quoted: unquoted, YAML would read 2020-01-25 as a date.
        assert recipe["RecipeFormatVersion"] == "2020-01-25"
        assert recipe["ComponentName"] == "com.example.IoTTunnelAgent"
        assert not recipe["ComponentName"].startswith("aws.greengrass")

    def test_version_is_the_packages(self):
        """ComponentVersion is semantic and equals the agent's version."""
        version = load_recipe()["ComponentVersion"]

        assert SEMVER.fullmatch(version)
        assert version == agent.__version__

    def test_access_control_allows_exactly_the_notify_subscription(self):
        """The IPC policy grants SubscribeToIoTCore on this thing's notify topic, nothing else."""
        access = default_configuration()["accessControl"]

        assert access == {
            "aws.greengrass.ipc.mqttproxy": {
                "com.example.IoTTunnelAgent:mqttproxy:1": {
                    "policyDescription": (
                        "Receive AWS IoT Secure Tunneling notifications for this core device."
                    ),
                    "operations": ["aws.greengrass#SubscribeToIoTCore"],
                    "resources": [NOTIFY_TOPIC],
                }
            }
        }

    def test_access_control_topic_is_the_one_the_source_subscribes_to(self):
        """With {iot:thingName} interpolated, the policy's resource is the source's topic."""
        from agent.notify.greengrass import GreengrassNotificationSource

        source = GreengrassNotificationSource(thing_name=THING)

        assert NOTIFY_TOPIC.replace("{iot:thingName}", THING) == source.topic

    def test_depends_on_a_nucleus_that_interpolates_access_control(self):
        """Interpolating {iot:thingName} in accessControl needs nucleus >= 2.6.0."""
        dependency = load_recipe()["ComponentDependencies"]["aws.greengrass.Nucleus"]

        assert dependency == {"VersionRequirement": ">=2.6.0 <3.0.0", "DependencyType": "SOFT"}

    def test_lifecycle_shape(self):
        """Linux manifest: Setenv, then unprivileged Install and Run steps of known keys."""
        lifecycle = manifest()["Lifecycle"]
        steps = {name: step for name, step in lifecycle.items() if name != "Setenv"}

        assert manifest()["Platform"] == {"os": "linux"}
        assert set(lifecycle) <= LIFECYCLE_STEPS
        assert set(steps) == {"Install", "Run"}
        assert all(set(step) <= STEP_KEYS and "Script" in step for step in steps.values())
        assert [step["RequiresPrivilege"] for step in steps.values()] == [False, False]
        assert lifecycle["Setenv"] == {
            "TUNNEL_AGENT_NOTIFY": "greengrass",
            "TUNNEL_AGENT_THING_NAME": "{iot:thingName}",
            "TUNNEL_AGENT_RUNTIME_DIR": "{work:path}/run",
            "TUNNEL_AGENT_TUNNELS__STATE_DIR": "{work:path}/state",
        }

    def test_artifacts_are_placeholders_used_by_the_scripts(self):
        """Each artifact is an s3:// placeholder with a unique name, and each is used."""
        artifacts = manifest()["Artifacts"]
        names = [artifact["URI"].rsplit("/", 1)[1] for artifact in artifacts]
        scripts = "\n".join(lifecycle_strings())
        referenced = set(re.findall(r"\{artifacts:path\}/([^\"\s]+)", scripts))

        assert all(a["URI"].startswith("s3://DOC-EXAMPLE-BUCKET/") for a in artifacts)
        assert all(
            a["Unarchive"] == "NONE" and a["Permission"] == {"Read": "OWNER"} for a in artifacts
        )
        assert len(set(names)) == len(names)
        assert referenced == set(names)
        assert f"iot_tunnel_agent-{agent.__version__}-py3-none-any.whl" in names

    def test_every_recipe_variable_resolves(self):
        """Lifecycle variables use known namespaces, and each configuration pointer exists."""
        variables = [m.groups() for s in lifecycle_strings() for m in VARIABLE.finditer(s)]
        pointers = [key for namespace, key in variables if namespace == "configuration"]

        assert {(ns, key) for ns, key in variables if ns != "configuration"} == {
            ("artifacts", "path"),
            ("work", "path"),
            ("iot", "thingName"),
        }
        assert pointers == ["/agent"]
        assert isinstance(resolve_pointer(default_configuration(), pointers[0]), dict)


def normalize(value: Any) -> Any:
    """What the rendered TOML must read back as: nulls gone, integral floats as ints."""
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [normalize(v) for v in value if v is not None]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def run_render(payload: str, output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RENDER), "--output", str(output)],
        input=payload,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def load_render_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_config", RENDER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_render_module().render

scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.none()
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


class TestRenderConfig:
    def test_default_configuration_renders_to_equal_toml(self):
        """The recipe's agent configuration, as the nucleus serialises it, reads back equal."""
        agent_config = default_configuration()["agent"]
        serialised = json.dumps(agent_config, separators=(",", ":"))

        assert tomllib.loads(render(json.loads(serialised))) == agent_config

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.text(), json_values, max_size=6))
    def test_any_json_object_round_trips(self, config):
        """Any JSON object renders to TOML that tomllib reads back as the same data."""
        assert tomllib.loads(render(config)) == normalize(config)

    def test_integral_floats_are_written_as_integers(self):
        """A port Greengrass turned into 22.0 is written 22, which the agent accepts."""
        text = render({"services": {"SSH": 22.0, "HTTP": "127.0.0.1:8080"}, "ratio": 0.5})

        assert text == 'ratio = 0.5\n[services]\nSSH = 22\nHTTP = "127.0.0.1:8080"\n'

    def test_refuses_what_toml_cannot_say(self):
        """NaN has no TOML form: rendering it raises instead of writing garbage."""
        with pytest.raises(ValueError, match="finite"):
            render({"x": math.nan})

    def test_writes_a_private_file(self, tmp_path):
        """The CLI writes the TOML with mode 0600 and exits 0."""
        output = tmp_path / "work" / "config.toml"

        result = run_render('{"thing_name":"x","services":{"SSH":"22"}}', output)

        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE(output.stat().st_mode) == 0o600
        assert output.read_text() == 'thing_name = "x"\n[services]\nSSH = "22"\n'

    @pytest.mark.parametrize(
        ("payload", "why"),
        [
            ("[1, 2]", "must be a JSON object"),
            ("{configuration:/agent}", "Expecting property name"),
            ('{"x": NaN}', "not a finite number"),
        ],
    )
    def test_refuses_a_bad_configuration_with_exit_78(self, tmp_path, payload, why):
        """A non-object, an uninterpolated variable or NaN exits 78 and writes nothing."""
        output = tmp_path / "config.toml"

        result = run_render(payload, output)

        assert result.returncode == 78
        assert why in result.stderr
        assert not output.exists()


def nucleus_environment(tmp_path: Path) -> dict[str, str]:
    """The environment the nucleus gives a component, plus the recipe's Setenv."""
    work = tmp_path / "work"
    setenv = {
        name: interpolate(value, configuration={}, work=work, artifacts=tmp_path / "artifacts")
        for name, value in manifest()["Lifecycle"]["Setenv"].items()
    }
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AWS_IOT_THING_NAME": THING,
        "AWS_REGION": "eu-west-1",
        "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": str(tmp_path / "ipc.socket"),
        "SVCUID": "svcuid-not-a-real-one",
        **setenv,
    }


def step_command(step: str, tmp_path: Path) -> dict[str, Any]:
    """Popen arguments running a lifecycle step the way the nucleus does on Linux."""
    work, artifacts = tmp_path / "work", tmp_path / "artifacts"
    work.mkdir(exist_ok=True)
    script = interpolate(
        manifest()["Lifecycle"][step]["Script"],
        configuration=default_configuration(),
        work=work,
        artifacts=artifacts,
    )
    return {"args": ["sh", "-c", script], "cwd": work, "env": nucleus_environment(tmp_path)}


def run_step(step: str, tmp_path: Path, *, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        **step_command(step, tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout * SCALE,
        check=False,
    )


STUB_AGENT = """#!{python}
# Stands in for the venv's tunnel-agent: records how the Run step started it.
import json, os, sys
with open({record!r}, "w") as record:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, record)
"""


class TestLifecycle:
    def test_run_renders_the_configuration_and_execs_the_agent(self, tmp_path):
        """Run writes config.toml from the component configuration and execs tunnel-agent run."""
        (tmp_path / "artifacts").mkdir()
        shutil.copy2(RENDER, tmp_path / "artifacts" / RENDER.name)
        venv_bin = tmp_path / "work" / "venv" / "bin"
        venv_bin.mkdir(parents=True)
        (venv_bin / "python").symlink_to(sys.executable)
        record = tmp_path / "started.json"
        stub = venv_bin / "tunnel-agent"
        stub.write_text(STUB_AGENT.format(python=sys.executable, record=str(record)))
        stub.chmod(0o755)

        result = run_step("Run", tmp_path, timeout=60)
        started = json.loads(record.read_text())
        config = tmp_path / "work" / "config.toml"

        assert result.returncode == 0, result.stderr
        assert started["argv"] == ["run", "--config", str(config)]
        assert started["env"]["TUNNEL_AGENT_NOTIFY"] == "greengrass"
        assert started["env"]["TUNNEL_AGENT_THING_NAME"] == THING
        assert tomllib.loads(config.read_text()) == default_configuration()["agent"]

    def test_rendered_configuration_passes_check_config(self, tmp_path):
        """The default component configuration is a valid agent configuration under Greengrass."""
        config = tmp_path / "work" / "config.toml"
        rendered = run_render(json.dumps(default_configuration()["agent"]), config)

        result = subprocess.run(
            [sys.executable, "-m", "agent", "check-config", "--config", str(config)],
            env=nucleus_environment(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=REPO,
        )

        assert rendered.returncode == 0, rendered.stderr
        assert result.returncode == 0, result.stderr

    @pytest.mark.slow
    def test_install_then_run_reaches_for_the_nucleus(self, tmp_path):
        """Install builds the venv from the artifacts; Run starts the agent on Greengrass IPC."""
        artifacts = tmp_path / "artifacts"
        artifacts.mkdir()
        shutil.copy2(RENDER, artifacts / RENDER.name)
        shutil.copy2(REPO / "packaging/debian/constraints.txt", artifacts / "constraints.txt")
        source = tmp_path / "src"
        shutil.copytree(
            REPO / "agent", source / "agent", ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copy2(REPO / "pyproject.toml", source / "pyproject.toml")
        readme = REPO / "README.md"
        (source / "README.md").write_text(readme.read_text() if readme.exists() else "")
        wheel = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "-w",
                str(artifacts),
                str(source),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert wheel.returncode == 0, wheel.stderr

        install = run_step("Install", tmp_path, timeout=600)
        version = subprocess.run(
            [str(tmp_path / "work/venv/bin/tunnel-agent"), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        log = tmp_path / "run.log"
        with log.open("wb") as output:
            run = subprocess.Popen(
                **step_command("Run", tmp_path), stdout=output, stderr=subprocess.STDOUT
            )
            try:
                # No nucleus listens on the IPC socket: the agent gets as far as the
                # Greengrass source's connection attempt, the rendered config accepted.
                deadline = time.monotonic() + 60 * SCALE
                while "Greengrass nucleus IPC" not in log.read_text(errors="replace"):
                    if run.poll() is not None or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            finally:
                if run.poll() is None:
                    run.terminate()
                run.wait(30)
        text = log.read_text(errors="replace")

        assert install.returncode == 0, install.stderr
        assert version.stdout.strip() == f"tunnel-agent {agent.__version__}"
        assert "cannot connect to the Greengrass nucleus IPC" in text, text
        assert "invalid configuration" not in text
