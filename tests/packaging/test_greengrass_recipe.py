"""
The Greengrass component: recipe, configuration rendering, offline artifacts, lifecycle.

The nucleus cannot run here, so the tests apply its recipe-variable rules themselves
(``interpolate`` below, after the recipe reference: a value node becomes its text, an
object node its compact JSON, a missing node stays as written) and run the resulting
Install and Run scripts with ``sh``, as the nucleus does on Linux.

The artifacts are built by packaging/greengrass/build.py (``make greengrass``) from a
wheel of this checkout; dependency wheels come from its download cache
(``$IOT_TUNNEL_AGENT_CACHE``, default ``~/.cache/iot-tunnel-agent``), filled from PyPI on
the first run only. The x86_64 artifact is then installed the way the recipe's Install
step does it, with pip's configuration disabled and an unusable proxy: offline.
"""

from __future__ import annotations

import importlib.util
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
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings, strategies as st

import agent


REPO = Path(__file__).resolve().parents[2]
GREENGRASS = REPO / "packaging" / "greengrass"
TEMPLATE = GREENGRASS / "recipe.yaml"
RENDER = GREENGRASS / "render_config.py"
CONSTRAINTS = REPO / "packaging" / "debian" / "constraints.txt"
SCALE = float(os.environ.get("TEST_TIME_SCALE", "1.0"))
THING = "gg-core-7"
NOTIFY_TOPIC = "$aws/things/{iot:thingName}/tunnels/notify"
VERSION = agent.__version__

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
# The nucleus' `architecture` platform attribute -> our artifact's architecture.
ARCHITECTURES = {"amd64": "x86_64", "aarch64": "aarch64", "arm": "armv7l"}
# The configuration keys of the aws.greengrass.SecureTunneling component.
OFFICIAL_KEYS = {"maxConcurrentTunnels", "tunnelTimeoutSeconds"}


def load_module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


render_config = load_module("render_config", RENDER)
build_script = load_module("greengrass_build", GREENGRASS / "build.py")
render = render_config.render


def rendered_recipe_text() -> str:
    return build_script.render_recipe(TEMPLATE.read_text(), component_version=VERSION, bucket=None)


def load_recipe() -> dict[str, Any]:
    return yaml.safe_load(rendered_recipe_text())


def manifests() -> dict[str, dict[str, Any]]:
    """The manifests by the architecture of their artifact."""
    return {ARCHITECTURES[m["Platform"]["architecture"]]: m for m in load_recipe()["Manifests"]}


def manifest(arch: str = "x86_64") -> dict[str, Any]:
    return manifests()[arch]


def default_configuration() -> dict[str, Any]:
    return load_recipe()["ComponentConfiguration"]["DefaultConfiguration"]


def resolve_pointer(document: Any, pointer: str) -> Any:
    """Follow an RFC 6901 JSON pointer; KeyError when it points nowhere."""
    node = document
    for token in pointer.split("/")[1:]:
        key = token.replace("~1", "/").replace("~0", "~")
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def merged(merge: dict[str, Any] | None = None) -> dict[str, Any]:
    """The default configuration with a deployment's merge (objects merge, values replace)."""

    def apply(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
        result = dict(base)
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = apply(result[key], value)
            else:
                result[key] = value
        return result

    return apply(default_configuration(), merge or {})


def interpolate(text: str, *, configuration: dict[str, Any], work: Path, artifacts: Path) -> str:
    """Replace recipe variables as the nucleus does for this component's lifecycle."""
    system = {
        ("artifacts", "path"): str(artifacts),
        ("artifacts", "decompressedPath"): str(artifacts / "decompressed"),
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


def lifecycle_strings(arch: str) -> list[str]:
    """Every string under a manifest's Lifecycle (the nucleus interpolates all of them)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(manifest(arch)["Lifecycle"])
    return found


class TestRecipeFormat:
    def test_is_yaml_with_the_recipe_format_keys(self):
        """The rendered recipe is YAML with the required keys and only keys the format defines."""
        recipe = load_recipe()

        assert REQUIRED_KEYS <= set(recipe) <= TOP_LEVEL_KEYS
        # Quoted: unquoted, YAML would read 2020-01-25 as a date.
        assert recipe["RecipeFormatVersion"] == "2020-01-25"
        assert recipe["ComponentName"] == "com.example.IoTTunnelAgent"
        assert not recipe["ComponentName"].startswith("aws.greengrass")

    def test_version_is_written_in_one_place(self):
        """The template holds no version; rendered, every version in it is agent.__version__."""
        template = TEMPLATE.read_text()
        recipe = load_recipe()
        uris = [a["URI"] for m in manifests().values() for a in m["Artifacts"]]
        installs = [m["Lifecycle"]["Install"] for m in manifests().values()]

        assert VERSION not in template
        assert yaml.safe_load(template)["ComponentVersion"] == "{COMPONENT_VERSION}"
        assert SEMVER.fullmatch(recipe["ComponentVersion"])
        assert recipe["ComponentVersion"] == VERSION
        assert all(f"/{VERSION}/" in uri for uri in uris)
        assert all(f'"iot-tunnel-agent=={VERSION}"' in step["Script"] for step in installs)
        assert all(step["Skipif"].endswith(f"/venv/.installed-{VERSION}") for step in installs)
        assert "{COMPONENT_VERSION}" not in rendered_recipe_text()

    def test_bucket_is_written_into_the_artifact_uris(self):
        """--bucket replaces the BUCKET_NAME placeholder of every URI and nothing else."""
        text = build_script.render_recipe(
            TEMPLATE.read_text(), component_version=VERSION, bucket="my-bucket"
        )
        uris = [a["URI"] for m in yaml.safe_load(text)["Manifests"] for a in m["Artifacts"]]

        assert uris == [
            f"s3://my-bucket/com.example.IoTTunnelAgent/{VERSION}/iot-tunnel-agent-{arch}.zip"
            for arch in ("x86_64", "aarch64", "armv7l")
        ]
        assert "s3://BUCKET_NAME" not in text

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

    def test_numbers_are_numbers(self):
        """No number in the default configuration is written as a string."""
        strings: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for value in node.values():
                    walk(value)
            elif isinstance(node, str) and re.fullmatch(r"[\d.]+", node):
                strings.append(node)

        walk(default_configuration())
        agent_config = default_configuration()["agent"]

        assert strings == []
        assert agent_config["services"] == {"SSH": 22}
        assert agent_config["proxy"]["max_restarts"] == 5

    def test_official_keys_are_aliases_not_defaults(self):
        """The official component's keys are read by Run but left unset by default."""
        run = manifest()["Lifecycle"]["Run"]["Script"]
        pointers = set(re.findall(r"\{configuration:/(\w+)\}", run))

        assert pointers == {"agent", *OFFICIAL_KEYS}
        assert not OFFICIAL_KEYS & set(default_configuration())
        assert not {"max_concurrent_tunnels", "max_tunnel_lifetime"} & set(
            default_configuration()["agent"]["limits"]
        )


class TestManifests:
    def test_one_manifest_per_architecture(self):
        """Linux on amd64, aarch64 and armv7l, each with its own zip, unarchived."""
        platforms = [m["Platform"] for m in load_recipe()["Manifests"]]
        artifacts = {arch: m["Artifacts"] for arch, m in manifests().items()}

        assert platforms == [
            {"os": "linux", "architecture": "amd64"},
            {"os": "linux", "architecture": "aarch64"},
            {"os": "linux", "architecture": "arm", "architecture.detail": "armv7l"},
        ]
        for arch, listed in artifacts.items():
            (only,) = listed
            assert only["URI"].endswith(f"/iot-tunnel-agent-{arch}.zip")
            assert only["Unarchive"] == "ZIP"
            assert only["Permission"] == {"Read": "OWNER"}

    @pytest.mark.parametrize("arch", ["x86_64", "aarch64", "armv7l"])
    def test_lifecycle_shape(self, arch):
        """Setenv, then unprivileged Install (skipped once installed) and Run steps."""
        lifecycle = manifest(arch)["Lifecycle"]
        steps = {name: step for name, step in lifecycle.items() if name != "Setenv"}

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

    @pytest.mark.parametrize("arch", ["x86_64", "aarch64", "armv7l"])
    def test_scripts_use_their_own_artifact(self, arch):
        """Install and Run name only the folder their manifest's zip unpacks to."""
        scripts = "\n".join(lifecycle_strings(arch))
        folders = set(re.findall(r"\{artifacts:decompressedPath\}/([^/\"\s]+)", scripts))

        assert folders == {f"iot-tunnel-agent-{arch}"}
        assert "{artifacts:path}" not in scripts

    def test_manifests_differ_only_where_the_architecture_does(self):
        """Scripts are the same text but for the folder; only armv7l may compile, for longer."""
        plain = {
            arch: {
                name: step["Script"].replace(f"iot-tunnel-agent-{arch}", "ARTIFACT")
                for name, step in m["Lifecycle"].items()
                if name != "Setenv"
            }
            for arch, m in manifests().items()
        }
        installs = {arch: m["Lifecycle"]["Install"] for arch, m in manifests().items()}

        assert plain["x86_64"] == plain["aarch64"]
        assert plain["x86_64"]["Run"] == plain["armv7l"]["Run"]
        assert "--no-index" in plain["armv7l"]["Install"]
        assert "--only-binary=:all:" in plain["x86_64"]["Install"]
        assert "--only-binary" not in plain["armv7l"]["Install"]
        assert installs["x86_64"]["Timeout"] == installs["aarch64"]["Timeout"] == 600
        assert 1800 <= installs["armv7l"]["Timeout"] <= 7200

    def test_every_recipe_variable_resolves(self):
        """Lifecycle variables use known namespaces; configuration pointers exist or are aliases."""
        variables = {
            m.groups() for arch in ARCHITECTURES.values() for s in lifecycle_strings(arch)
            for m in VARIABLE.finditer(s)
        }  # fmt: skip
        pointers = {key for namespace, key in variables if namespace == "configuration"}
        defaults = default_configuration()

        assert {(ns, key) for ns, key in variables if ns != "configuration"} == {
            ("artifacts", "decompressedPath"),
            ("work", "path"),
            ("iot", "thingName"),
        }
        assert pointers == {"/agent", "/pythonInterpreter", "/maxConcurrentTunnels",
                            "/tunnelTimeoutSeconds"}  # fmt: skip
        assert isinstance(resolve_pointer(defaults, "/agent"), dict)
        assert resolve_pointer(defaults, "/pythonInterpreter") == "python3"


def normalize(value: Any) -> Any:
    """What the rendered TOML must read back as: nulls gone, integral floats as ints."""
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [normalize(v) for v in value if v is not None]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def run_render(payload: str, output: Path, python: str = sys.executable):
    return subprocess.run(
        [python, str(RENDER), "--output", str(output)],
        input=payload,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def run_payload(configuration: dict[str, Any], arch: str = "x86_64") -> str:
    """What the Run step feeds render_config.py for CONFIGURATION (its here-document)."""
    script = interpolate(
        manifest(arch)["Lifecycle"]["Run"]["Script"],
        configuration=configuration,
        work=Path("/work"),
        artifacts=Path("/artifacts"),
    )
    return script.split("<<'END_OF_COMPONENT_CONFIGURATION'\n", 1)[1].split(
        "\nEND_OF_COMPONENT_CONFIGURATION", 1
    )[0]


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
        """The CLI writes the agent's TOML with mode 0600 and exits 0."""
        output = tmp_path / "work" / "config.toml"

        result = run_render('{"agent": {"thing_name":"x","services":{"SSH":22}}}', output)

        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE(output.stat().st_mode) == 0o600
        assert output.read_text() == 'thing_name = "x"\n[services]\nSSH = 22\n'

    @pytest.mark.parametrize(
        ("payload", "why"),
        [
            ("[1, 2]", "expected a JSON object with the key 'agent'"),
            ("{configuration:/agent}", "Expecting property name"),
            ('{"agent": {"x": NaN}}', "not a finite number"),
            ('{"agent": [1]}', "'agent' must be a JSON object"),
            ('{"agent": {}, "OS_DIST_INFO": "auto"}', "unknown key 'OS_DIST_INFO'"),
            (
                '{"agent": {}, "maxConcurrentTunnels": "ten"}',
                "maxConcurrentTunnels must be a whole",
            ),
            (
                '{"agent": {}, "tunnelTimeoutSeconds": "1.5"}',
                "tunnelTimeoutSeconds must be a whole",
            ),
            (
                '{"agent": {"limits": {"max_concurrent_tunnels": 5}}, "maxConcurrentTunnels": "5"}',
                "maxConcurrentTunnels and agent.limits.max_concurrent_tunnels are both set",
            ),
        ],
    )
    def test_refuses_a_bad_configuration_with_exit_78(self, tmp_path, payload, why):
        """A non-object, an uninterpolated variable, NaN or a bad alias exits 78, writes nothing."""
        output = tmp_path / "config.toml"

        result = run_render(payload, output)

        assert result.returncode == 78
        assert why in result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert not output.exists()

    def test_official_keys_become_the_agents_limits(self, tmp_path):
        """The official maxConcurrentTunnels and tunnelTimeoutSeconds land in [limits]."""
        output = tmp_path / "config.toml"
        configuration = merged({"maxConcurrentTunnels": 20, "tunnelTimeoutSeconds": 43200.0})

        result = run_render(run_payload(configuration), output)
        limits = tomllib.loads(output.read_text())["limits"]

        assert result.returncode == 0, result.stderr
        assert limits == {
            "on_limit": "refuse_new",
            "max_concurrent_tunnels": 20,
            "max_tunnel_lifetime": 43200,
        }

    def test_unset_official_keys_leave_the_agents_defaults(self, tmp_path):
        """Variables the nucleus leaves as written (keys not set) add nothing to [limits]."""
        output = tmp_path / "config.toml"
        payload = run_payload(default_configuration())

        result = run_render(payload, output)

        assert "{configuration:/maxConcurrentTunnels}" in payload
        assert result.returncode == 0, result.stderr
        assert tomllib.loads(output.read_text()) == default_configuration()["agent"]

    @pytest.mark.parametrize(
        ("value", "expected"),
        [(20, 20), (20.0, 20), ("20", 20), ("20.0", 20), ("", None), ("null", None), (None, None)],
    )
    def test_alias_values(self, value, expected):
        """An alias is a whole number in any JSON or text form; empty or null means unset."""
        agent_config = render_config.apply_aliases({"agent": {}, "maxConcurrentTunnels": value})

        assert agent_config.get("limits", {}).get("max_concurrent_tunnels") == expected


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


def offline_environment(tmp_path: Path) -> dict[str, str]:
    """The nucleus' environment with no package index in reach: no pip config, a dead proxy."""
    dead = "http://127.0.0.1:9"
    return {
        **nucleus_environment(tmp_path),
        "PIP_CONFIG_FILE": os.devnull,
        "http_proxy": dead,
        "https_proxy": dead,
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
    }


def step_command(
    step: str, tmp_path: Path, configuration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Popen arguments running a lifecycle step the way the nucleus does on Linux."""
    work, artifacts = tmp_path / "work", tmp_path / "artifacts"
    work.mkdir(exist_ok=True)
    script = interpolate(
        manifest()["Lifecycle"][step]["Script"],
        configuration=default_configuration() if configuration is None else configuration,
        work=work,
        artifacts=artifacts,
    )
    return {"args": ["sh", "-c", script], "cwd": work, "env": offline_environment(tmp_path)}


def run_step(
    step: str, tmp_path: Path, *, timeout: float, configuration: dict[str, Any] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        **step_command(step, tmp_path, configuration),
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


class TestRunStep:
    def test_renders_the_configuration_and_execs_the_agent(self, tmp_path):
        """Run writes config.toml from the component configuration and execs tunnel-agent run."""
        folder = tmp_path / "artifacts" / "decompressed" / "iot-tunnel-agent-x86_64"
        folder.mkdir(parents=True)
        shutil.copy2(RENDER, folder / RENDER.name)
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


# -- the artifacts, built and installed offline ------------------------------------------------


def pinned() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def distribution(filename: str) -> tuple[str, str]:
    """(normalised name, version) of a wheel or sdist file name."""
    stem = filename.removesuffix(".whl").removesuffix(".tar.gz")
    name, version = stem.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/greengrass as `make greengrass` writes it, from a wheel of this checkout."""
    root = tmp_path_factory.mktemp("greengrass-build")
    source = root / "src"
    shutil.copytree(REPO / "agent", source / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    wheel = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(root / "dist"), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert wheel.returncode == 0, wheel.stderr
    output = root / "greengrass"
    result = subprocess.run(
        [sys.executable, str(GREENGRASS / "build.py"), "--output", str(output),
         "--wheel", str(root / "dist" / f"iot_tunnel_agent-{VERSION}-py3-none-any.whl")],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return output


def zip_path(built: Path, arch: str) -> Path:
    return (
        built
        / "artifacts"
        / "com.example.IoTTunnelAgent"
        / VERSION
        / f"iot-tunnel-agent-{arch}.zip"
    )


def zip_names(built: Path, arch: str) -> list[str]:
    with zipfile.ZipFile(zip_path(built, arch)) as archive:
        return archive.namelist()


@pytest.mark.integration
class TestArtifacts:
    def test_the_recipe_is_rendered_beside_the_zips(self, built):
        """The GDK's layout: the zips under their S3 key, the recipe rendered with this version."""
        files = sorted(str(p.relative_to(built)) for p in built.rglob("*") if p.is_file())
        uris = [a["URI"] for m in manifests().values() for a in m["Artifacts"]]

        assert files == [
            f"artifacts/com.example.IoTTunnelAgent/{VERSION}/iot-tunnel-agent-{arch}.zip"
            for arch in ("aarch64", "armv7l", "x86_64")
        ] + ["recipes/recipe.yaml"]
        assert sorted(uri.replace("s3://BUCKET_NAME/", "artifacts/") for uri in uris) == files[:3]
        assert (built / "recipes" / "recipe.yaml").read_text() == rendered_recipe_text()

    @pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
    def test_64_bit_zips_hold_a_wheel_of_every_dependency_per_python(self, built, arch):
        """Every runtime pin has a manylinux wheel for this architecture and CPython 3.11-3.13."""
        names = zip_names(built, arch)
        wheels = [n for n in names if n.endswith(".whl")]
        found = {distribution(n) for n in wheels}
        native = {n for n in wheels if not n.endswith("-none-any.whl")}
        runtime = {"awscrt", "awsiotsdk", "pydantic", "pydantic-core", "pydantic-settings",
                   "structlog", "websockets", "uvloop", "typing-extensions"}  # fmt: skip

        assert "render_config.py" in names
        assert ("iot-tunnel-agent", VERSION) in found
        assert runtime <= {name for name, _ in found}
        assert all(pinned()[name] == version for name, version in found if name in pinned())
        assert not [n for n in names if n.endswith(".tar.gz")]
        assert all(re.search(rf"manylinux(2014|_2_17|1)_{arch}", n) for n in native)
        for project in ("pydantic_core", "uvloop", "websockets"):
            tags = {n.split("-")[2] for n in native if n.startswith(project + "-")}
            assert tags == {"cp311", "cp312", "cp313"}, (project, tags)

    def test_armv7l_zip_carries_awscrt_as_source_and_no_uvloop(self, built):
        """No armv7l wheel of awscrt: its sdist and setuptools come along; uvloop does not."""
        names = zip_names(built, "armv7l")
        found = {distribution(n)[0] for n in names if n.endswith((".whl", ".tar.gz"))}
        native = [n for n in names if n.endswith(".whl") and not n.endswith("-none-any.whl")]

        assert f"awscrt-{pinned()['awscrt']}.tar.gz" in names
        assert "setuptools" in found
        assert "uvloop" not in found
        assert {"pydantic-core", "websockets", "awsiotsdk", "iot-tunnel-agent"} <= found
        assert native
        assert all("armv7l" in n for n in native)

    def test_a_second_build_is_the_same_bytes(self, built, tmp_path):
        """Zips are reproducible: rebuilt from the same wheel and cache, byte for byte equal."""
        wheel = next((built.parent / "dist").glob("*.whl"))
        subprocess.run(
            [sys.executable, str(GREENGRASS / "build.py"), "--output", str(tmp_path),
             "--wheel", str(wheel), "--arch", "x86_64"],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip

        again = zip_path(tmp_path, "x86_64").read_bytes()

        assert again == zip_path(built, "x86_64").read_bytes()


@pytest.fixture(scope="module")
def installed(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A core's directory after the x86_64 manifest's Install step ran offline."""
    core = tmp_path_factory.mktemp("core")
    folder = core / "artifacts" / "decompressed" / "iot-tunnel-agent-x86_64"
    with zipfile.ZipFile(zip_path(built, "x86_64")) as archive:
        archive.extractall(folder)
    result = run_step("Install", core, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return core


def check_config(core: Path, merge: dict[str, Any] | None = None):
    """Render CONFIGURATION as the Run step does, then run the venv's check-config on it."""
    config = core / "work" / "config.toml"
    venv = core / "work" / "venv" / "bin"
    folder = core / "artifacts" / "decompressed" / "iot-tunnel-agent-x86_64"
    rendered = run_render(run_payload(merged(merge)), config, python=str(venv / "python"))
    assert rendered.returncode == 0, rendered.stderr
    result = subprocess.run(
        [str(venv / "tunnel-agent"), "check-config", "--config", str(config)],
        env=offline_environment(core),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=core,
    )
    assert (folder / "render_config.py").read_bytes() == RENDER.read_bytes()
    return tomllib.loads(config.read_text()), result


@pytest.mark.integration
class TestOfflineInstall:
    def test_install_builds_the_venv_without_an_index(self, installed):
        """Install leaves a venv with this version and its stamp (what Skipif looks for)."""
        version = subprocess.run(
            [str(installed / "work/venv/bin/tunnel-agent"), "--version"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

        assert version.stdout.strip() == f"tunnel-agent {VERSION}"
        assert (installed / f"work/venv/.installed-{VERSION}").is_file()

    def test_install_refuses_an_old_python_in_one_line(self, tmp_path):
        """A pythonInterpreter that is not Python >= 3.11 fails the step in one line."""
        old = tmp_path / "python2"
        old.write_text("#!/bin/sh\nexit 1\n")
        old.chmod(0o755)

        result = run_step("Install", tmp_path, timeout=60, configuration=merged(
            {"pythonInterpreter": str(old)}
        ))  # fmt: skip

        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"iot-tunnel-agent: '{old}' is not Python >= 3.11: set pythonInterpreter"
        )
        assert not (tmp_path / "work" / "venv").exists()

    def test_check_config_passes_on_the_default_configuration(self, installed):
        """The default component configuration is a valid agent configuration under Greengrass."""
        config, result = check_config(installed)

        assert result.returncode == 0, result.stderr
        assert config == default_configuration()["agent"]
        assert "services: SSH=22" in result.stdout

    def test_check_config_sees_the_official_keys(self, installed):
        """A deployment using the official component's keys configures the agent's limits."""
        config, result = check_config(
            installed, {"maxConcurrentTunnels": 20, "tunnelTimeoutSeconds": 3600}
        )

        assert result.returncode == 0, result.stderr
        assert config["limits"]["max_concurrent_tunnels"] == 20
        assert config["limits"]["max_tunnel_lifetime"] == 3600
        assert "max_concurrent_tunnels=20" in result.stdout

    def test_check_config_refuses_an_out_of_range_alias(self, installed):
        """The agent, not the renderer, judges the value: 0 tunnels exits 78 naming the field."""
        _config, result = check_config(installed, {"maxConcurrentTunnels": 0})

        assert result.returncode == 78
        assert "max_concurrent_tunnels" in result.stderr

    def test_run_reaches_for_the_nucleus(self, installed):
        """Run renders the configuration and starts the agent on Greengrass IPC."""
        log = installed / "run.log"
        with log.open("wb") as output:
            run = subprocess.Popen(
                **step_command("Run", installed), stdout=output, stderr=subprocess.STDOUT
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

        assert "cannot connect to the Greengrass nucleus IPC" in text, text
        assert "invalid configuration" not in text
