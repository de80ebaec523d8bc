#!/usr/bin/env bash
# Build dist/iot-tunnel-agent_<version>_<arch>.deb (`make deb`; run from anywhere).
#
# The package carries a self-contained virtualenv at /opt/iot-tunnel-agent, made with
# Debian's own /usr/bin/python3 so its compiled wheels match the device's interpreter,
# holding the project and its runtime dependencies only (no extras, no agent/emulator),
# and the man pages packaging/manpages.py writes from that venv's own argparse parsers.
# Plain dpkg-deb, no debhelper: there is no Debian source package to maintain.
#
# Where the venv is built: in a staging root, at $STAGE/opt/iot-tunnel-agent, never at
# the real /opt/iot-tunnel-agent, which could clobber an installed copy on the build
# machine. venv and pip write the staging path into a few text files (script shebangs,
# activate, pyvenv.cfg's "command", direct_url.json); step 4 rewrites or removes them
# and the build fails if any byte of the staging path is left. Byte-code is not shipped:
# postinst compiles it on the device (the unit's ProtectSystem=strict makes /opt
# read-only at run time) and prerm removes it, as Debian's own Python packages do.
#
# Needs: python3 (>= 3.11) with the venv module (python3-venv), dpkg-dev (dpkg-deb,
# dpkg-shlibdeps), and PyPI for the pinned wheels (packaging/debian/constraints.txt).
# Environment: PYTHON (default /usr/bin/python3), DIST (default <repo>/dist), CONFIG_EXAMPLE
# (default <repo>/config/config.example.toml), PACKAGE_VERSION (default agent.__version__;
# set, it is also written into the packaged agent/__init__.py, e.g. to test an upgrade),
# SOURCE_DATE_EPOCH (default: the last commit's time, for reproducible timestamps),
# SOURCE_BUILDS=1 (allow compiling dependencies that have no wheel, e.g. awscrt on armhf).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$REPO/packaging/debian
PKG=iot-tunnel-agent
PREFIX=/opt/$PKG
PYTHON=${PYTHON:-/usr/bin/python3}
DIST=${DIST:-$REPO/dist}
CONFIG=${CONFIG_EXAMPLE:-$REPO/config/config.example.toml}

die() { echo "build.sh: $*" >&2; exit 1; }
step() { echo "build.sh: $*" >&2; }

# -- 0. preconditions -------------------------------------------------------------
[ -x "$PYTHON" ] || die "$PYTHON not found: apt-get install python3 python3-venv"
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is Python $PYVER; the agent needs >= 3.11"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
  || die "$PYTHON cannot create virtualenvs: apt-get install python${PYVER}-venv"
for tool in dpkg-deb dpkg-shlibdeps strip; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install dpkg-dev"
done
[ -f "$CONFIG" ] || die "$CONFIG is missing (the conffile /etc/$PKG/config.toml)"

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/agent/__init__.py")
[ -n "$VERSION" ] || die "cannot read __version__ from agent/__init__.py"
if [ -n "${PACKAGE_VERSION:-}" ]; then
  # Digits and dots: valid for both Debian and Python (PEP 440), and safe in sed below.
  [[ "$PACKAGE_VERSION" =~ ^[0-9]+(\.[0-9]+)*$ ]] \
    || die "PACKAGE_VERSION=$PACKAGE_VERSION: only digits and dots (e.g. 1.2.3)"
  VERSION=$PACKAGE_VERSION
fi
ARCH=$(dpkg --print-architecture)
# The venv's python symlink points at this exact interpreter and the wheels are built
# for its ABI, so the package depends on that minor version, not just "python3".
PYBIN=/usr/bin/python$PYVER
[ -x "$PYBIN" ] || die "$PYBIN not found"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/$PKG-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/root
VENV=$STAGE$PREFIX
DEB=$DIST/${PKG}_${VERSION}_${ARCH}.deb
step "building $PKG $VERSION for $ARCH with $PYBIN ($("$PYBIN" -V 2>&1))"

# -- 1. the project's sources, minus what the device does not run ------------------
# Copied so the build never writes into the checkout (build/, *.egg-info).
mkdir -p "$WORK/src"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' \
  --exclude=agent/emulator --exclude='agent/demo' --exclude='agent/demo.py' \
  -cf - pyproject.toml agent | tar -C "$WORK/src" -xf -
if [ -f "$REPO/README.md" ]; then cp "$REPO/README.md" "$WORK/src/"; else : >"$WORK/src/README.md"; fi
# The version the package says is the version the agent reports.
sed -i "s/^__version__ = \".*\"$/__version__ = \"$VERSION\"/" "$WORK/src/agent/__init__.py"
grep -qx "__version__ = \"$VERSION\"" "$WORK/src/agent/__init__.py" || die "cannot set __version__"
if [ -f "$REPO/LICENSE" ]; then cp "$REPO/LICENSE" "$WORK/src/"; fi

# -- 2. the virtualenv at its final path inside the staging root -------------------
step "creating the virtualenv"
"$PYBIN" -m venv "$VENV"
VPY=$VENV/bin/python
step "building the project wheel"
"$VPY" -m pip wheel -q --no-deps --wheel-dir "$WORK/wheels" "$WORK/src"
WHEEL=$(ls "$WORK"/wheels/iot_tunnel_agent-*.whl)
step "installing $(basename "$WHEEL") and its pinned runtime dependencies"
# --no-compile: byte-code would embed the staging path; postinst compiles on the device.
# Wheels only by default: they are what the tests ran against. 32-bit ARM has no awscrt
# wheel: SOURCE_BUILDS=1 lets pip compile it (needs cmake, build-essential, python3-dev).
BINARY=(--only-binary=:all:)
if [ "${SOURCE_BUILDS:-0}" = 1 ]; then BINARY=(); fi
"$VPY" -m pip install -q --no-compile "${BINARY[@]}" \
  --constraint "$HERE/constraints.txt" "$WHEEL"
# The man pages, from the parsers of the code just installed (packaging/manpages.py).
step "writing the man pages"
"$VPY" "$REPO/packaging/manpages.py" "$WORK/man" >/dev/null
# pip and setuptools are build tools; the device never installs into this venv.
"$VPY" -m pip uninstall -q -y pip setuptools

# -- 3. prune ---------------------------------------------------------------------
find "$VENV" -depth \( -name __pycache__ -o -name '*.pyc' \) -exec rm -rf {} +
rm -f "$VENV"/bin/activate.csh "$VENV"/bin/activate.fish "$VENV"/bin/Activate.ps1
# Console scripts of dependencies (websockets, dotenv): only ours are the package's commands.
find "$VENV/bin" -type f ! -name activate ! -name tunnel-agent ! -name tunnel-localproxy -delete
rmdir "$VENV/include/python$PYVER" "$VENV/include"
# Strip as dh_strip does: the wheels' extension modules carry symbol tables
# (lintian: unstripped-binary-or-object); --strip-unneeded keeps the dynamic symbols.
find "$VENV" -type f -name '*.so*' -exec strip --strip-unneeded \
  --remove-section=.comment --remove-section=.note {} +
# PEP 610 metadata pointing at the temporary wheel: meaningless on the device.
find "$VENV" -path '*.dist-info/direct_url.json' -delete
# pip's installer record of the wheels it installed into this venv.
find "$VENV" -path '*.dist-info/INSTALLER' -delete

# -- 4. no staging path may survive; RECORDs match the files ----------------------
grep -rlIF "$STAGE" "$VENV" | while read -r file; do
  sed -i "s|$STAGE||g" "$file"
done
if grep -rlF "$WORK" "$STAGE" >"$WORK/leaks"; then
  die "build paths left in: $(tr '\n' ' ' <"$WORK/leaks")"
fi
# The interpreter symlinks must point at Debian's python, not the build machine's venv.
[ "$(readlink "$VENV/bin/python")" = "$PYBIN" ] || ln -sfn "$PYBIN" "$VENV/bin/python"
# Make every RECORD true again: drop files removed above, rehash the rewritten scripts
# (their recorded hashes covered the random staging path: the build would not repeat).
"$PYBIN" - "$VENV" <<'PY'
import base64, csv, hashlib, io, pathlib, sys

for record in pathlib.Path(sys.argv[1]).glob("lib/python*/site-packages/*.dist-info/RECORD"):
    site = record.parent.parent
    rows = []
    for row in csv.reader(io.StringIO(record.read_text())):
        path = (site / row[0]).resolve() if row else None
        if path is None or not path.exists():
            continue
        if row[1]:
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            row[1:3] = ["sha256=" + digest.decode(), str(len(data))]
        rows.append(row)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    record.write_text(out.getvalue())
PY

# -- 5. the rest of the file system -----------------------------------------------
install -d "$STAGE/usr/bin" "$STAGE/lib/systemd/system" "$STAGE/etc/$PKG" \
  "$STAGE/usr/share/doc/$PKG" "$STAGE/usr/share/lintian/overrides" "$STAGE/DEBIAN" \
  "$STAGE/usr/share/man/man1"
for page in "$WORK"/man/*.1; do
  gzip -9nc "$page" >"$STAGE/usr/share/man/man1/$(basename "$page").gz"
done
# Across top-level directories Debian policy §10.5 wants absolute links.
ln -s "$PREFIX/bin/tunnel-agent" "$STAGE/usr/bin/tunnel-agent"
ln -s "$PREFIX/bin/tunnel-localproxy" "$STAGE/usr/bin/tunnel-localproxy"
install -m 0644 "$REPO/systemd/$PKG.service" "$STAGE/lib/systemd/system/$PKG.service"
install -m 0644 "$CONFIG" "$STAGE/etc/$PKG/config.toml"
install -m 0644 "$HERE/copyright" "$STAGE/usr/share/doc/$PKG/copyright"
install -m 0644 "$HERE/lintian-overrides" "$STAGE/usr/share/lintian/overrides/$PKG"
if [ -f "$REPO/README.md" ]; then
  gzip -9nc "$REPO/README.md" >"$STAGE/usr/share/doc/$PKG/README.md.gz"
fi
# A native package's changelog, generated so it always names the version being built.
{
  echo "$PKG ($VERSION) unstable; urgency=medium"
  echo
  echo "  * Release $VERSION. See the project's history for changes."
  echo
  echo " -- IoT Tunnel Agent maintainers <iot-tunnel-agent@example.com>  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$STAGE/usr/share/doc/$PKG/changelog.gz"

# -- 6. modes, timestamps, control files ------------------------------------------
find "$STAGE" -type d -exec chmod 0755 {} +
find "$STAGE" -type f -exec chmod 0644 {} +
# Only the console scripts are executables; modules and shared objects (mapped, not
# executed) are 0644 as Debian ships them, whatever modes the wheels carried.
chmod 0755 "$VENV/bin/tunnel-agent" "$VENV/bin/tunnel-localproxy"

for script in postinst prerm postrm; do
  install -m 0755 "$HERE/$script" "$STAGE/DEBIAN/$script"
done
echo "/etc/$PKG/config.toml" >"$STAGE/DEBIAN/conffiles"

# Library dependencies of the wheels' ELF objects, as dpkg-shlibdeps computes them.
# Libraries the wheels bundle themselves (auditwheel's *.libs) are found through RPATH.
mkdir -p "$WORK/shlibs/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$PKG" "$PKG" >"$WORK/shlibs/debian/control"
mapfile -t elves < <(find "$VENV" -type f -name '*.so*' | sort)
SHLIBS=""
if [ "${#elves[@]}" -gt 0 ]; then
  SHLIBS=$(cd "$WORK/shlibs" && dpkg-shlibdeps -O --ignore-missing-info \
    "${elves[@]/#/-e}" 2>"$WORK/shlibdeps.log" | sed -n 's/^shlibs:Depends=//p') \
    || { cat "$WORK/shlibdeps.log" >&2; die "dpkg-shlibdeps failed"; }
fi
# procps: the unit's ExecReload= runs /bin/kill (found missing by the nspawn boot test).
DEPENDS="python3 (>= 3.11), python$PYVER, adduser, procps${SHLIBS:+, $SHLIBS}"

INSTALLED_SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s|@VERSION@|$VERSION|" -e "s|@ARCH@|$ARCH|" -e "s|@DEPENDS@|$DEPENDS|" \
  -e "s|@INSTALLED_SIZE@|$INSTALLED_SIZE|" "$HERE/control.in" >"$STAGE/DEBIAN/control"
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
  | xargs -0 md5sum) >"$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles" "$STAGE/DEBIAN/md5sums"
find "$STAGE" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# -- 7. the archive ----------------------------------------------------------------
mkdir -p "$DIST"
rm -f "$DEB"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
step "wrote $DEB ($(du -h "$DEB" | cut -f1), installed size ${INSTALLED_SIZE} KiB)"
echo "$DEB"
