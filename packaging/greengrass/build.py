#!/usr/bin/env python3
"""
Build the Greengrass component: one offline artifact per architecture and the recipe.

``make greengrass`` runs this after ``make wheel``. For each architecture it writes
``iot-tunnel-agent-<arch>.zip`` holding the project's wheel, a wheel of every runtime
dependency (the pins of packaging/debian/constraints.txt) for each supported CPython,
and render_config.py; the recipe's Install step runs ``pip install --no-index
--find-links`` on the unzipped folder, so the core device needs no package index.

- x86_64, aarch64: manylinux2014 wheels only; nothing is compiled on the device.
- armv7l: awscrt publishes no 32-bit ARM wheel, so the zip carries its source
  distribution and the setuptools wheel that builds it; the recipe's arm Install
  step compiles it once per component version (bounded by the step's Timeout).
  uvloop is left out there, as pyproject's marker says.

Wheels are downloaded once into a cache (``$IOT_TUNNEL_AGENT_CACHE``, default
``~/.cache/iot-tunnel-agent``) and taken from it afterwards without the network; a
changed pin downloads only what is missing. The recipe (recipe.yaml beside this
script) is rendered with the version of agent/__init__.py, the one place it is
written, and the S3 bucket given with ``--bucket``.

The output has the layout of the Greengrass Development Kit's greengrass-build/:
``artifacts/<component>/<version>/*.zip`` (what goes to the bucket, as is) and
``recipes/recipe.yaml``.

Standard library only; pip is run as ``python -m pip`` with the interpreter running
this script. Exit status 0 built, 1 a download or the wheel is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


__all__ = ["ARCHITECTURES", "PYTHONS", "Target", "build", "main", "render_recipe"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONSTRAINTS = REPO / "packaging" / "debian" / "constraints.txt"
RECIPE = HERE / "recipe.yaml"
RENDER_CONFIG = HERE / "render_config.py"
ARCHITECTURES = ("x86_64", "aarch64", "armv7l")
# The CPython versions a core may run (Debian 12 / Raspberry Pi OS 12: 3.11, Ubuntu 24.04:
# 3.12, Debian 13: 3.13). pydantic-core, uvloop and websockets ship one wheel per version.
PYTHONS = ("3.11", "3.12", "3.13")
# awscrt's sdist declares setuptools>=75.3.1 as its build backend; pip builds it offline
# from this wheel on an armv7l core.
ARMV7L_BUILD_REQUIREMENTS = ("setuptools==80.9.0",)
SOURCE_ONLY_ON_ARMV7L = "awscrt"
NOT_ON_ARMV7L = "uvloop"
# Zip entries get this time when SOURCE_DATE_EPOCH is unset: equal inputs, equal zips.
DEFAULT_EPOCH = 315532800  # 1980-01-01, the earliest time a zip can store


@dataclass(frozen=True)
class Target:
    """One pip platform: an architecture and a CPython version."""

    arch: str
    python: str

    @property
    def platform(self) -> str:
        """The ``pip --platform`` tag: manylinux2014 (glibc 2.17) for the widest reach."""
        return f"manylinux2014_{self.arch}"

    @property
    def cache_name(self) -> str:
        """The cache sub-directory of this target."""
        return f"{self.arch}-cp{self.python.replace('.', '')}"


def _say(text: str) -> None:
    sys.stderr.write(f"greengrass/build.py: {text}\n")


def version() -> str:
    """Read ``__version__`` from agent/__init__.py without importing the package."""
    text = (REPO / "agent" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise SystemExit("greengrass/build.py: no __version__ in agent/__init__.py")
    return match.group(1)


def pins() -> dict[str, str]:
    """Return the runtime pins, normalised name -> ``name==version``."""
    found = {}
    for raw in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name = line.split("==", 1)[0].strip()
            found[_normalise(name)] = line
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution(filename: str) -> str:
    """The normalised project name of a wheel or sdist file name."""
    stem = filename.removesuffix(".tar.gz").removesuffix(".zip").removesuffix(".whl")
    return _normalise(stem.split("-", 1)[0])


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _download(cache: Path, dest: Path, args: list[str]) -> None:
    """
    Run ``pip download`` ARGS into DEST.

    From CACHE alone when it holds everything, else from the index into CACHE first,
    so that the next build needs no network.
    """
    cache.mkdir(parents=True, exist_ok=True)
    common = ["download", "--quiet", "--dest", str(dest), *args]
    offline = _pip(*common, "--no-index", "--find-links", str(cache))
    if offline.returncode == 0:
        return
    online = _pip("download", "--quiet", "--dest", str(cache), *args)
    if online.returncode != 0:
        raise SystemExit(f"greengrass/build.py: pip download {' '.join(args)}:\n{online.stderr}")
    again = _pip(*common, "--no-index", "--find-links", str(cache))
    if again.returncode != 0:
        raise SystemExit(f"greengrass/build.py: {dest} from the cache:\n{again.stderr}")


def _binary(target: Target) -> list[str]:
    return [
        "--only-binary=:all:",
        "--platform",
        target.platform,
        "--python-version",
        target.python,
        "--implementation",
        "cp",
    ]


def _resolve(wheel: Path, target: Target, cache: Path, dest: Path) -> None:
    """The wheel's runtime closure at the pinned versions, as wheels for TARGET."""
    # Markers are evaluated for the build machine (pip cannot do otherwise); for x86_64
    # and aarch64 they agree with the target: uvloop's marker admits both.
    _download(
        cache,
        dest,
        [*_binary(target), "--constraint", str(CONSTRAINTS), str(wheel)],
    )


def _resolve_armv7l(closure: set[str], target: Target, cache: Path, dest: Path) -> None:
    """The same closure for armv7l: wheels where they exist, awscrt as its sdist."""
    pinned = pins()
    wheels = sorted(
        pinned[name] for name in closure if name not in {SOURCE_ONLY_ON_ARMV7L, NOT_ON_ARMV7L}
    )
    _download(cache, dest, [*_binary(target), "--no-deps", *wheels])
    _download(cache, dest, ["--no-deps", "--only-binary=:all:", *ARMV7L_BUILD_REQUIREMENTS])
    _sdist(pinned[SOURCE_ONLY_ON_ARMV7L], cache, dest)


def _sdist(requirement: str, cache: Path, dest: Path) -> None:
    """Copy NAME==VERSION's source distribution into DEST, downloading it once."""
    name, version_ = requirement.split("==")
    wanted = f"{name.replace('-', '_')}-{version_}.tar.gz"
    cached = cache / wanted
    if not cached.is_file():
        # pip prepares the sdist's metadata, building setuptools from PyPI as it would.
        _download(cache, cache, ["--no-deps", "--no-binary", name, requirement])
    if not cached.is_file():
        raise SystemExit(f"greengrass/build.py: pip did not download {wanted}")
    shutil.copy2(cached, dest / wanted)


def _zip(folder: Path, archive: Path) -> None:
    """Zip FOLDER's files flat and reproducibly (sorted, fixed time, fixed modes)."""
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    epoch = max(epoch, DEFAULT_EPOCH)
    stamp = time.gmtime(epoch)[:6]
    partial = archive.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for path in sorted(folder.iterdir()):
            info = zipfile.ZipInfo(path.name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            out.writestr(info, path.read_bytes())
    partial.replace(archive)


def render_recipe(template: str, *, component_version: str, bucket: str | None) -> str:
    """
    Fill the recipe template: ``{COMPONENT_VERSION}`` everywhere, ``BUCKET_NAME`` in URIs.

    Args:
        template: recipe.yaml's text.
        component_version: The agent's version (agent/__init__.py).
        bucket: The S3 bucket the artifacts are uploaded to, or None to keep the
            ``BUCKET_NAME`` placeholder.

    Returns:
        The recipe to create the component version with.
    """
    rendered = template.replace("{COMPONENT_VERSION}", component_version)
    if bucket is not None:
        rendered = rendered.replace("s3://BUCKET_NAME/", f"s3://{bucket}/")
    return rendered


def build(  # noqa: PLR0913 - the keyword options of one command
    *,
    wheel: Path,
    output: Path,
    cache: Path,
    architectures: tuple[str, ...] = ARCHITECTURES,
    pythons: tuple[str, ...] = PYTHONS,
    bucket: str | None = None,
) -> list[Path]:
    """
    Write one zip per architecture and the recipe into OUTPUT (artifacts/, recipes/).

    Args:
        wheel: The project's wheel (``make wheel``).
        output: Directory for the zips and the recipe (created).
        cache: Download cache for dependency wheels.
        architectures: Which of :data:`ARCHITECTURES` to build.
        pythons: Which CPython versions to carry wheels for.
        bucket: S3 bucket written into the recipe's artifact URIs.

    Returns:
        The files written, zips first.
    """
    expected = f"iot_tunnel_agent-{version()}-py3-none-any.whl"
    if wheel.name != expected or not wheel.is_file():
        raise SystemExit(f"greengrass/build.py: {wheel} is not {expected}: run `make wheel`")
    template = RECIPE.read_text(encoding="utf-8")
    component = re.search(r"^ComponentName: (\S+)$", template, re.MULTILINE)
    if component is None:
        raise SystemExit(f"greengrass/build.py: no ComponentName in {RECIPE}")
    artifacts = output / "artifacts" / component.group(1) / version()
    shutil.rmtree(output / "artifacts", ignore_errors=True)
    artifacts.mkdir(parents=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="greengrass-build.") as temporary:
        scratch = Path(temporary)
        # Per CPython: the names of the runtime closure, as resolved for a 64-bit target.
        closures: dict[str, set[str]] = {}

        def resolved(target: Target) -> Path:
            dest = scratch / target.cache_name
            dest.mkdir(exist_ok=True)
            if target.arch != "armv7l":
                _resolve(wheel, target, cache / target.cache_name, dest)
                closures[target.python] = {_distribution(p.name) for p in dest.iterdir()}
                return dest
            if target.python not in closures:
                resolved(Target("x86_64", target.python))
            closure = closures[target.python] - {"iot-tunnel-agent"}
            _resolve_armv7l(closure, target, cache / target.cache_name, dest)
            return dest

        for arch in architectures:
            folder = scratch / f"iot-tunnel-agent-{arch}"
            folder.mkdir()
            for python in pythons:
                for path in resolved(Target(arch, python)).iterdir():
                    shutil.copy2(path, folder / path.name)
            shutil.copy2(wheel, folder / wheel.name)
            shutil.copy2(RENDER_CONFIG, folder / RENDER_CONFIG.name)
            archive = artifacts / f"{folder.name}.zip"
            _zip(folder, archive)
            digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
            _say(f"wrote {archive} ({archive.stat().st_size // 1024} KiB, sha256 {digest}...)")
            written.append(archive)
    recipe = output / "recipes" / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(
        render_recipe(template, component_version=version(), bucket=bucket), encoding="utf-8"
    )
    _say(f"wrote {recipe}")
    written.append(recipe)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: see ``--help``."""
    default_cache = Path(
        os.environ.get("IOT_TUNNEL_AGENT_CACHE", Path.home() / ".cache" / "iot-tunnel-agent")
    )
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "dist" / "greengrass")
    parser.add_argument(
        "--wheel",
        type=Path,
        default=REPO / "dist" / f"iot_tunnel_agent-{version()}-py3-none-any.whl",
        help="the project's wheel (default: the one `make wheel` writes)",
    )
    parser.add_argument(
        "--cache", type=Path, default=default_cache / "greengrass-wheels", help="download cache"
    )
    parser.add_argument("--arch", action="append", choices=ARCHITECTURES, dest="arches")
    parser.add_argument("--python", action="append", dest="pythons", metavar="X.Y")
    parser.add_argument("--bucket", help="S3 bucket for the recipe's artifact URIs")
    args = parser.parse_args(argv)
    build(
        wheel=args.wheel,
        output=args.output,
        cache=args.cache,
        architectures=tuple(args.arches or ARCHITECTURES),
        pythons=tuple(args.pythons or PYTHONS),
        bucket=args.bucket,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
