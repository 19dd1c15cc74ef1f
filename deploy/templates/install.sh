#!/bin/bash
# Installs the edgesplit device service from this device package (made by
# `edgesplit bundle device`) on 64-bit Raspberry Pi OS, Bookworm or newer.
#
#   sudo ./install.sh                 install (or upgrade) and start the service
#   ./install.sh --local --prefix D   a local test target: everything under D, no apt,
#                                     no system user, no systemd (and it says so)
#
# Options (or the environment variable in brackets):
#   --offline / --online    pip from the wheels in this package only / from the index too
#                           [EDGESPLIT_OFFLINE=1|0]; default: offline when the package ships
#                           its dependencies (made with --offline-wheels)
#   --local                 skip the Pi-only steps (apt, user, systemd) [EDGESPLIT_LOCAL=1]
#   --prefix DIR            install under DIR (/opt, /etc, /var/lib below it) [EDGESPLIT_PREFIX]
#   --python PY             the Python to build the venv from (default /usr/bin/python3) [EDGESPLIT_PYTHON]
#   --interpreter PKG       ai-edge-litert or tflite-runtime (default: the first that installs)
#                           [EDGESPLIT_INTERPRETER_PACKAGE]
#   --no-system-site-packages  a venv that does not see apt's packages [EDGESPLIT_SYSTEM_SITE_PACKAGES=0]
#   --no-start              enable the unit but do not (re)start it [EDGESPLIT_START=0]
#
# Layout: /opt/edgesplit/{venv,bundle}  /etc/edgesplit/{device.toml,credentials/}
#         /var/lib/edgesplit (state: outbox, results, inbox/)  /etc/systemd/system/edgesplit-device.service
# pip runs here, at install time, never when the service runs.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UNIT=edgesplit-device.service
SERVICE_USER=edgesplit
SKIPPED=()
WARNINGS=()

say() { printf 'install.sh: %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; WARNINGS+=("$*"); }
die() {
    printf 'install.sh: error: %s\n' "$1" >&2
    [ $# -gt 1 ] && printf '  fix: %s\n' "$2" >&2
    exit 1
}
skip() { SKIPPED+=("$*"); say "skipped (local target): $*"; }
usage() { sed -n '2,24s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

LOCAL=${EDGESPLIT_LOCAL:-0}
PREFIX=${EDGESPLIT_PREFIX:-}
OFFLINE=${EDGESPLIT_OFFLINE:-auto}
PYTHON=${EDGESPLIT_PYTHON:-}
START=${EDGESPLIT_START:-1}
SYSTEM_SITE=${EDGESPLIT_SYSTEM_SITE_PACKAGES:-1}
INTERPRETER=${EDGESPLIT_INTERPRETER_PACKAGE:-}
FIRSTBOOT=${EDGESPLIT_FIRSTBOOT:-0}

while [ $# -gt 0 ]; do
    case "$1" in
        --local) LOCAL=1 ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#--prefix=} ;;
        --offline) OFFLINE=1 ;;
        --online) OFFLINE=0 ;;
        --python) [ $# -ge 2 ] || die "--python needs a path"; PYTHON=$2; shift ;;
        --python=*) PYTHON=${1#--python=} ;;
        --interpreter) [ $# -ge 2 ] || die "--interpreter needs a package"; INTERPRETER=$2; shift ;;
        --interpreter=*) INTERPRETER=${1#--interpreter=} ;;
        --no-system-site-packages) SYSTEM_SITE=0 ;;
        --no-start) START=0 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1" "see ./install.sh --help" ;;
    esac
    shift
done

# ------------------------------------------------------------------ the package itself
[ -f "$HERE/package.env" ] || die "package.env is missing next to install.sh" \
    "unpack the whole device package (tar -xzf pi.tar.gz) and run install.sh from it"
# shellcheck source=/dev/null
. "$HERE/package.env"
say "edgesplit device package: device ${EDGESPLIT_PKG_DEVICE_ID}, fleet ${EDGESPLIT_PKG_FLEET}, bundle ${EDGESPLIT_PKG_BUNDLE_ID}, edgesplit ${EDGESPLIT_PKG_VERSION}"
if ! (cd "$HERE" && sha256sum --quiet -c SHA256SUMS); then
    die "files of the device package do not match their SHA256SUMS (damaged or changed)" \
        "copy the package again, or rebuild it with \`edgesplit bundle device\`"
fi

if [ "$OFFLINE" = auto ]; then OFFLINE=$EDGESPLIT_PKG_OFFLINE; fi
if [ "$PREFIX" != "" ]; then
    case "$PREFIX" in /*) ;; *) PREFIX="$(pwd)/$PREFIX" ;; esac
    PREFIX=${PREFIX%/}
    [ "$LOCAL" = 1 ] || warn "--prefix without --local still runs apt, useradd and systemctl"
fi
if [ "$LOCAL" != 1 ] && [ "$(id -u)" -ne 0 ]; then
    die "install.sh must run as root to install a system service" \
        "sudo ./install.sh   (or ./install.sh --local --prefix DIR for a local test target)"
fi

OPT="$PREFIX/opt/edgesplit"
ETC="$PREFIX/etc/edgesplit"
STATE="$PREFIX/var/lib/edgesplit"
UNITDIR="$PREFIX/etc/systemd/system"
VENV="$OPT/venv"

# ------------------------------------------------------------------ the machine
ARCH=$(uname -m)
if [ -r /etc/os-release ]; then
    # shellcheck source=/dev/null
    OS_NAME=$(. /etc/os-release && printf '%s' "${PRETTY_NAME:-unknown}")
    # shellcheck source=/dev/null
    OS_CODENAME=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
else
    OS_NAME=unknown; OS_CODENAME=""
fi
say "target: $OS_NAME, $ARCH$([ "$LOCAL" = 1 ] && printf ', local target under %s' "${PREFIX:-/}")"
if [ "$LOCAL" != 1 ]; then
    case "$ARCH" in
        aarch64) ;;
        armv6l|armv7l) die "this is a 32-bit OS ($ARCH): the TFLite interpreters have no wheels for it" \
                           "flash the 64-bit Raspberry Pi OS (Bookworm or newer)" ;;
        *) warn "$ARCH is not a Raspberry Pi (aarch64); carrying on" ;;
    esac
    case "$OS_CODENAME" in
        bookworm|trixie|forky) ;;
        bullseye|buster|stretch) die "$OS_NAME is too old: edgesplit needs Bookworm or newer" \
                                     "flash a current 64-bit Raspberry Pi OS" ;;
        *) warn "untested OS ($OS_NAME); carrying on" ;;
    esac
fi

# ------------------------------------------------------------------ apt
APT_PKGS=(python3-venv python3-numpy python3-pil python3-cryptography)   # cryptography: signed bundle updates
if [ "$EDGESPLIT_PKG_CAMERA" = 1 ]; then APT_PKGS+=(python3-picamera2); fi
if [ "$LOCAL" = 1 ]; then
    skip "apt-get install ${APT_PKGS[*]}"
else
    MISSING=()
    for p in "${APT_PKGS[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then MISSING+=("$p"); fi
    done
    if [ ${#MISSING[@]} -gt 0 ]; then
        say "apt-get install ${MISSING[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${MISSING[@]}"; }; then
            for p in "${MISSING[@]}"; do
                if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
                    case "$p" in
                        python3-venv) die "apt-get could not install python3-venv (no network?)" \
                                          "connect the Pi to the network and run install.sh again" ;;
                        python3-picamera2) warn "python3-picamera2 is not installed: the camera input will not work" ;;
                        *) warn "$p is not installed; pip installs it into the venv instead" ;;
                    esac
                fi
            done
        fi
    else
        say "apt packages already installed: ${APT_PKGS[*]}"
    fi
fi

# ------------------------------------------------------------------ the service user
if [ "$LOCAL" = 1 ]; then
    skip "creating the system user '$SERVICE_USER'"
else
    if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/edgesplit --no-create-home \
            --shell /usr/sbin/nologin --comment "edgesplit device service" "$SERVICE_USER"
        say "created the system user $SERVICE_USER"
    fi
    if getent group video >/dev/null; then usermod -a -G video "$SERVICE_USER"; fi
fi

# ------------------------------------------------------------------ the venv
if [ -z "$PYTHON" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=$(command -v python3 || true); fi
fi
if [ -z "$PYTHON" ] || [ ! -x "$PYTHON" ]; then
    die "no python3 found${PYTHON:+ at $PYTHON}" "sudo apt install python3 python3-venv"
fi
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PYTHON is Python $PYVER; edgesplit needs 3.10 or newer" "use Raspberry Pi OS Bookworm or newer"
if [ "$OFFLINE" = 1 ]; then
    if [ "$EDGESPLIT_PKG_WHEEL_PYTHON" != "$PYVER" ] || [ "$EDGESPLIT_PKG_WHEEL_ARCH" != "$ARCH" ]; then
        die "the wheels in this package are for Python $EDGESPLIT_PKG_WHEEL_PYTHON on $EDGESPLIT_PKG_WHEEL_ARCH; this is Python $PYVER on $ARCH" \
            "rebuild it: edgesplit bundle device ... --offline-wheels --python-version $PYVER (--wheel-platform $ARCH), or install online: ./install.sh --online"
    fi
fi

mkdir -p "$OPT" "$ETC" "$STATE"
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" != "$PYVER" ]; then
    say "the venv was made with another Python: making it anew"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    VENV_ARGS=()
    if [ "$SYSTEM_SITE" = 1 ]; then VENV_ARGS+=(--system-site-packages); fi
    say "python3 -m venv ${VENV_ARGS[*]:+${VENV_ARGS[*]} }$VENV   (Python $PYVER)"
    "$PYTHON" -m venv "${VENV_ARGS[@]}" "$VENV" \
        || die "could not create the venv at $VENV" "sudo apt install python3-venv"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
PIP=("$VENV/bin/python" -m pip install --no-cache-dir --prefer-binary)
if [ "$OFFLINE" = 1 ]; then
    PIP+=(--no-index --find-links "$HERE/wheels")
    say "pip: offline, from the $(find "$HERE/wheels" -name '*.whl' | wc -l) wheels in this package"
else
    PIP+=(--find-links "$HERE/wheels")
    say "pip: online (the package index) and the wheels in this package"
fi
CONSTRAINTS="$STATE/.install-constraints.txt"
cp "$HERE/wheels/constraints.txt" "$CONSTRAINTS"
if [ "$SYSTEM_SITE" = 1 ]; then
    # keep apt's numpy: picamera2 and simplejpeg are built against it
    SYS_NUMPY=$("$PYTHON" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || true)
    if [ -n "$SYS_NUMPY" ] && [ "$LOCAL" != 1 ] && ! grep -qi '^numpy' "$CONSTRAINTS"; then
        printf 'numpy==%s\n' "$SYS_NUMPY" >>"$CONSTRAINTS"
        say "keeping the system's numpy $SYS_NUMPY"
    fi
fi
PIP+=(-c "$CONSTRAINTS")
WHEEL=$(find "$HERE/wheels" -maxdepth 1 -name 'edgesplit-*.whl' | sort | tail -n 1)
[ -n "$WHEEL" ] || die "the package has no edgesplit wheel" "rebuild it with \`edgesplit bundle device\`"

say "installing $(basename "$WHEEL") and its device dependencies"
"${PIP[@]}" --quiet -r "$HERE/wheels/requirements.txt" "$WHEEL" \
    || die "pip could not install edgesplit's dependencies (see above)" \
           "$([ "$OFFLINE" = 1 ] && printf 'rebuild the package with --offline-wheels for this Python/arch' || printf 'check the network, or build the package with --offline-wheels')"
# same version number, new code: replace edgesplit itself every time
"${PIP[@]}" --quiet --force-reinstall --no-deps "$WHEEL"

if [ -n "$INTERPRETER" ]; then CANDIDATES=("$INTERPRETER")
elif [ "$EDGESPLIT_PKG_INTERPRETER" != auto ]; then CANDIDATES=("$EDGESPLIT_PKG_INTERPRETER")
else CANDIDATES=(ai-edge-litert tflite-runtime); fi
INSTALLED_INTERPRETER=""
for cand in "${CANDIDATES[@]}"; do
    say "TFLite interpreter: pip install $cand"
    if "${PIP[@]}" --quiet "$cand"; then INSTALLED_INTERPRETER=$cand; break; fi
    warn "$cand could not be installed$([ "$cand" = ai-edge-litert ] && printf '; trying tflite-runtime')"
done
[ -n "$INSTALLED_INTERPRETER" ] || die "no TFLite interpreter could be installed (${CANDIDATES[*]})" \
    "use 64-bit Raspberry Pi OS with Python 3.11 or 3.13, or build the package with --offline-wheels"
# -I: nothing from the working directory or PYTHON* variables may stand in for the installed code
BACKEND=$("$VENV/bin/python" -I -c 'from runtime.interpreter import pick_backend; b = pick_backend(); print(b.name, b.version)' 2>&1) \
    || die "the venv cannot load a TFLite interpreter: $BACKEND" "run: $VENV/bin/python -I -m edgesplit doctor"
say "interpreter: $BACKEND"

# ------------------------------------------------------------------ files
# the package's paths are the standard ones; a prefix moves them all
relocate() {
    if [ -n "$PREFIX" ]; then
        local p=${PREFIX//\\/\\\\}; p=${p//&/\\&}; p=${p//|/\\|}
        sed -e "s|/opt/edgesplit|$p/opt/edgesplit|g" -e "s|/etc/edgesplit|$p/etc/edgesplit|g" \
            -e "s|/var/lib/edgesplit|$p/var/lib/edgesplit|g" "$1"
    else
        cat "$1"
    fi
}

rm -rf "$OPT/bundle.new"
cp -R "$HERE/bundle" "$OPT/bundle.new"
chmod -R u=rwX,go=rX "$OPT/bundle.new"
rm -rf "$OPT/bundle.old"
if [ -d "$OPT/bundle" ]; then mv "$OPT/bundle" "$OPT/bundle.old"; fi
mv "$OPT/bundle.new" "$OPT/bundle"
rm -rf "$OPT/bundle.old"
say "bundle ${EDGESPLIT_PKG_BUNDLE_ID} -> $OPT/bundle"

if [ -f "$ETC/device.toml" ] && ! relocate "$HERE/device.toml" | cmp -s - "$ETC/device.toml"; then
    cp -p "$ETC/device.toml" "$ETC/device.toml.bak"
    say "the previous config is kept as $ETC/device.toml.bak"
fi
relocate "$HERE/device.toml" >"$ETC/device.toml.new"
chmod 644 "$ETC/device.toml.new"
mv "$ETC/device.toml.new" "$ETC/device.toml"

# credentials: root only; systemd hands the service its own copy (LoadCredential=)
CRED="$ETC/credentials"
mkdir -p "$CRED"
chmod 700 "$CRED"
if [ -d "$HERE/credentials" ]; then
    for f in "$HERE"/credentials/*; do
        [ -f "$f" ] || continue
        install -m 600 "$f" "$CRED/$(basename "$f")"
    done
fi
say "config -> $ETC/device.toml, credentials -> $CRED/ ($(find "$CRED" -type f | wc -l) file(s), mode 600)"

mkdir -p "$STATE/inbox"
if [ "$LOCAL" = 1 ]; then
    skip "chown -R $SERVICE_USER: $STATE"
else
    chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE"
    chmod 750 "$STATE"
fi
rm -f "$CONSTRAINTS"

mkdir -p "$UNITDIR"
relocate "$HERE/systemd/$UNIT" >"$UNITDIR/$UNIT"
chmod 644 "$UNITDIR/$UNIT"
say "systemd unit -> $UNITDIR/$UNIT"

if [ "$LOCAL" = 1 ]; then
    skip "ln -s $VENV/bin/edgesplit /usr/local/bin/edgesplit"
else
    ln -sfn "$VENV/bin/edgesplit" /usr/local/bin/edgesplit
fi

# ------------------------------------------------------------------ check what was installed
say "checking: edgesplit doctor --config $ETC/device.toml --skip broker"
if ! "$VENV/bin/python" -I -m edgesplit doctor --config "$ETC/device.toml" --skip broker; then
    die "the installed device does not pass its checks (above)" "follow the fix lines above, then run install.sh again"
fi

# ------------------------------------------------------------------ systemd
if [ "$LOCAL" = 1 ]; then
    skip "systemctl daemon-reload && systemctl enable --now $UNIT"
elif ! command -v systemctl >/dev/null || [ ! -d /run/systemd/system ]; then
    warn "systemd is not running here: enable the unit by hand (systemctl enable --now $UNIT)"
else
    systemctl daemon-reload
    systemctl enable "$UNIT" >/dev/null 2>&1
    if [ "$START" = 1 ]; then
        if [ "$FIRSTBOOT" = 1 ]; then
            # a first-boot oneshot must not wait for another unit's start-up
            systemctl restart --no-block "$UNIT"
            say "started $UNIT"
        elif systemctl restart "$UNIT"; then
            say "started $UNIT: $(systemctl show -p StatusText --value "$UNIT")"
        else
            warn "$UNIT did not start: journalctl -u $UNIT -n 50"
        fi
    else
        say "enabled $UNIT (not started: --no-start)"
    fi
fi

say "done in ${SECONDS} s: device ${EDGESPLIT_PKG_DEVICE_ID}, $BACKEND, $([ "$OFFLINE" = 1 ] && echo offline || echo online) install"
if [ ${#SKIPPED[@]} -gt 0 ]; then
    say "skipped on this local target (Pi-only steps):"
    for s in "${SKIPPED[@]}"; do printf '  - %s\n' "$s"; done
fi
if [ ${#WARNINGS[@]} -gt 0 ]; then
    say "warnings:"
    for w in "${WARNINGS[@]}"; do printf '  - %s\n' "$w"; done
fi
exit 0
