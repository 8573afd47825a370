#!/usr/bin/env bash
# Install the SEM defect-inspection edge runtime as a systemd service on a 64-bit ARM board
# (Raspberry Pi OS 64-bit, NVIDIA Jetson / JetPack on aarch64 Ubuntu). Only the edge parts are
# installed (`pip install <repo>[edge]`: numpy, Pillow, PyYAML, LiteRT): no TensorFlow.
#
#   sudo deploy/install.sh --bundle models/NAME        install or update everything, start the service
#   sudo deploy/install.sh                             re-run: updates code/unit, keeps bundle and config
#   deploy/install.sh --dry-run --bundle models/NAME   print what would be done; changes nothing
#   sudo deploy/install.sh --uninstall [--purge]       remove (keeps results/config unless --purge)
#
# Safe to run again: every step checks what is already there. See deploy/README.md.
set -euo pipefail
# The service user must be able to read the venv and bundles whatever root's umask is.
umask 022

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

PREFIX=/opt/sem-inspect
VENV=""
DATA_DIR=/var/lib/sem-inspect
CONF_DIR=/etc/sem-inspect
UNIT_DIR=/etc/systemd/system
SERVICE_USER=sem-inspect
UNIT_NAME=sem-inspect.service
PYTHON_BIN=""
RUNTIME=auto
BUNDLE=""
DRY_RUN=0
START=1
WITH_SERVICE=1
FLEET=0
UNINSTALL=0
PURGE=0

usage() {
    cat <<EOF
Usage: $0 [options]

Options:
  --bundle DIR        model bundle folder (manifest.yaml + .tflite) to install and make current
  --prefix DIR        install root for the venv and bundles (default: $PREFIX)
  --venv DIR          virtual environment (default: PREFIX/venv)
  --data-dir DIR      drop folder, processed/, quarantine/, db/ (default: $DATA_DIR)
  --config-dir DIR    service config folder (default: $CONF_DIR)
  --user NAME         unprivileged system user the service runs as (default: $SERVICE_USER)
  --python PATH       Python 3.10 to 3.13 to build the venv with (default: python3.13 ... python3.10, python3)
  --runtime NAME      auto | litert | tflite-runtime (default: auto = LiteRT, else tflite-runtime + numpy<2)
  --no-start          install and enable the service but do not (re)start it now
  --no-service        venv and bundle only: no user, folders, config or systemd unit
  --fleet             also the fleet extra (MQTT, HTTP /metrics) and the unit's network drop-in fleet.conf
  --dry-run           print every action instead of doing it (no root needed)
  --uninstall         stop and remove the service, venv and bundles (keeps data, config and user)
  --purge             with --uninstall: also remove data, config and the user
  -h, --help          this help
EOF
}

# ---------------------------------------------------------------------------------------------------
# Messages and actions
# ---------------------------------------------------------------------------------------------------
STEP=0
step() { STEP=$((STEP + 1)); printf '\n[%d] %s\n' "$STEP" "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

# Run a command that changes the system, or print it under --dry-run.
run() {
    if ((DRY_RUN)); then
        printf '    would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        printf '    +'
        printf ' %q' "$@"
        printf '\n'
        "$@"
    fi
}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --bundle) need_value "$@"; BUNDLE=$2; shift 2 ;;
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --venv) need_value "$@"; VENV=$2; shift 2 ;;
        --data-dir) need_value "$@"; DATA_DIR=$2; shift 2 ;;
        --config-dir) need_value "$@"; CONF_DIR=$2; shift 2 ;;
        --user) need_value "$@"; SERVICE_USER=$2; shift 2 ;;
        --python) need_value "$@"; PYTHON_BIN=$2; shift 2 ;;
        --runtime) need_value "$@"; RUNTIME=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        --no-service) WITH_SERVICE=0; shift ;;
        --fleet) FLEET=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

VENV=${VENV:-$PREFIX/venv}
MODELS_DIR=$PREFIX/models
CONFIG_FILE=$CONF_DIR/service.yaml
UNIT_FILE=$UNIT_DIR/$UNIT_NAME
STATE_DIRS=("$DATA_DIR/incoming" "$DATA_DIR/processed" "$DATA_DIR/quarantine" "$DATA_DIR/db")

case $RUNTIME in auto | litert | tflite-runtime) ;; *) die "--runtime must be auto, litert or tflite-runtime" ;; esac
((PURGE)) && ! ((UNINSTALL)) && die "--purge only goes with --uninstall"
# The paths are written into the systemd unit and the YAML config: keep them to plain characters.
for value in "$PREFIX" "$VENV" "$DATA_DIR" "$CONF_DIR"; do
    [[ $value =~ ^/[A-Za-z0-9._/-]+$ ]] || die "paths must be absolute and use only letters, digits, . _ - / (got '$value')"
done
[[ $SERVICE_USER =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user: '$SERVICE_USER' is not a valid system user name"
if [[ -n $BUNDLE ]]; then
    [[ -d $BUNDLE ]] || die "--bundle: $BUNDLE is not a folder"
    BUNDLE=$(cd "$BUNDLE" && pwd -P)     # the real folder (its name becomes the installed name)
    [[ -f $BUNDLE/manifest.yaml ]] || die "--bundle: $BUNDLE has no manifest.yaml (make one with: python -m convert --int8 --run runs/NAME)"
fi

if ((DRY_RUN)); then
    printf 'Dry run: nothing is changed; the commands are printed instead.\n'
elif [[ $(id -u) -ne 0 ]]; then
    die "run as root (sudo $0 ...), or add --dry-run to see what would be done"
fi

have_systemd() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; }

# ---------------------------------------------------------------------------------------------------
# Uninstall
# ---------------------------------------------------------------------------------------------------
if ((UNINSTALL)); then
    step "Removing the service"
    if have_systemd && systemctl cat "$UNIT_NAME" >/dev/null 2>&1; then
        run systemctl disable --now "$UNIT_NAME"
    fi
    if [[ -f $UNIT_FILE.d/fleet.conf ]]; then
        run rm -f "$UNIT_FILE.d/fleet.conf"
    fi
    if [[ -f $UNIT_FILE ]]; then
        run rm -f "$UNIT_FILE"
        have_systemd && run systemctl daemon-reload
    else
        info "no unit at $UNIT_FILE"
    fi
    step "Removing the virtual environment and bundles"
    if [[ -d $PREFIX ]]; then run rm -rf "$PREFIX"; else info "nothing at $PREFIX"; fi
    if ((PURGE)); then
        step "Purging results, config and the service user"
        [[ -d $DATA_DIR ]] && run rm -rf "$DATA_DIR"
        [[ -d $CONF_DIR ]] && run rm -rf "$CONF_DIR"
        if id -u "$SERVICE_USER" >/dev/null 2>&1; then run userdel "$SERVICE_USER"; fi
    else
        info "kept: results and images in $DATA_DIR, config in $CONF_DIR, user $SERVICE_USER (--purge removes them)"
    fi
    printf '\nUninstalled.\n'
    exit 0
fi

# ---------------------------------------------------------------------------------------------------
# 1. The system
# ---------------------------------------------------------------------------------------------------
step "Checking the system"
OS_NAME=unknown
if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    OS_NAME=$(. /etc/os-release && printf '%s' "${PRETTY_NAME:-${ID:-unknown}}")
fi
BOARD="generic Linux"
if [[ -r /etc/nv_tegra_release ]]; then
    BOARD="NVIDIA Jetson ($(head -n1 /etc/nv_tegra_release | cut -c1-60))"
elif [[ -r /proc/device-tree/model ]] && grep -qa "Raspberry Pi" /proc/device-tree/model; then
    BOARD=$(tr -d '\0' </proc/device-tree/model)
fi
ARCH=$(uname -m)
info "board: $BOARD; OS: $OS_NAME; kernel architecture: $ARCH"
case $ARCH in
    aarch64 | arm64) ;;
    x86_64) warn "this is an x86-64 machine, not an ARM board; continuing (ai-edge-litert has x86-64 wheels too)" ;;
    armv6l | armv7l | armhf)
        die "32-bit ARM ($ARCH) is not supported: LiteRT publishes 64-bit wheels only. Install the 64-bit
       Raspberry Pi OS (Raspberry Pi Imager: 'Raspberry Pi OS (64-bit)') and run this again." ;;
    *) die "unsupported architecture $ARCH (needs aarch64)" ;;
esac
# A 64-bit kernel can run a 32-bit user space (old Raspberry Pi OS images): that needs the 64-bit OS too.
if command -v dpkg >/dev/null 2>&1 && [[ $(dpkg --print-architecture) == armhf ]]; then
    die "the kernel is 64-bit but the OS user space is 32-bit (armhf): install Raspberry Pi OS (64-bit)"
fi

python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
python_ok() {
    local v
    v=$(python_version "$1") || return 1
    [[ $v == 3.10 || $v == 3.11 || $v == 3.12 || $v == 3.13 ]]
}

explain_python() {
    cat >&2 <<EOF

The edge runtime needs Python 3.10 to 3.13 (pyproject.toml: requires-python >=3.10,<3.14); found: ${1:-none}.
How to get it:
  * Raspberry Pi OS 13 (trixie) 64-bit ships 3.13, Raspberry Pi OS 12 (bookworm) 3.11, JetPack 6 (Ubuntu 22.04)
    3.10: all fine as they are:   sudo apt install python3 python3-venv
  * Raspberry Pi OS 11 (bullseye) has 3.9: re-image with a 64-bit OS 12 or 13 (recommended), or use pyenv.
  * Jetson JetPack 5 (Ubuntu 20.04, Python 3.8): deadsnakes PPA
      sudo apt install software-properties-common
      sudo add-apt-repository ppa:deadsnakes/ppa && sudo apt update
      sudo apt install python3.11 python3.11-venv
  * Any distribution: pyenv (builds 3.11 from source, ~15 min on a Pi 4), installed outside /home and /root
    so the service can use it:
      sudo apt install git build-essential libssl-dev zlib1g-dev libbz2-dev libreadline-dev libsqlite3-dev \\
           libffi-dev liblzma-dev
      sudo git clone https://github.com/pyenv/pyenv /opt/pyenv
      sudo env PYENV_ROOT=/opt/pyenv /opt/pyenv/bin/pyenv install 3.11
      -> then: --python /opt/pyenv/versions/3.11.<N>/bin/python3.11
Then run this script again (with --python /path/to/python3.11 if it is not on PATH).
EOF
}

if [[ -n $PYTHON_BIN ]]; then
    command -v "$PYTHON_BIN" >/dev/null 2>&1 || die "--python $PYTHON_BIN: not found"
    if ! python_ok "$PYTHON_BIN"; then
        explain_python "$PYTHON_BIN $(python_version "$PYTHON_BIN" || echo '?')"
        die "--python $PYTHON_BIN is not Python 3.10 to 3.13"
    fi
else
    found=""
    # PATH first, then the system ones (a PATH entry may be a pyenv Python in a home folder).
    for candidate in python3.13 python3.12 python3.11 python3.10 python3 /usr/bin/python3.13 /usr/bin/python3.12 \
        /usr/bin/python3.11 /usr/bin/python3.10 /usr/bin/python3 /usr/local/bin/python3.13 /usr/local/bin/python3.12 \
        /usr/local/bin/python3.11 /usr/local/bin/python3.10; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        found="$found $candidate=$(python_version "$candidate" || echo '?')"
        python_ok "$candidate" || continue
        if ((WITH_SERVICE)) && "$candidate" -c 'import sys; sys.exit(not sys.base_prefix.startswith(("/root/", "/home/")))'; then
            found="$found(in a home folder: skipped)"
            continue
        fi
        PYTHON_BIN=$candidate
        break
    done
    if [[ -z $PYTHON_BIN ]]; then
        explain_python "${found# }"
        die "no Python 3.10 to 3.13 found"
    fi
fi
# The interpreter itself, not a wrapper (pyenv shim, alternatives link): the venv records this path.
PYTHON_BIN=$("$PYTHON_BIN" -c 'import sys; print(sys.executable)')
PY_VERSION=$(python_version "$PYTHON_BIN")
PY_MACHINE=$("$PYTHON_BIN" -c 'import platform; print(platform.machine())')
info "python: $PYTHON_BIN ($PY_VERSION, $PY_MACHINE)"
if [[ $ARCH == aarch64 && $PY_MACHINE != aarch64 ]]; then
    die "$PYTHON_BIN is a $PY_MACHINE build on an aarch64 kernel: a 64-bit (aarch64) Python is needed"
fi
# The venv links to this interpreter and its standard library: the service user must reach them, and
# ProtectHome=yes hides /root and /home from the service (a pyenv Python in a home folder cannot work).
PY_BASE=$("$PYTHON_BIN" -c 'import sys; print(sys.base_prefix)')
if ((WITH_SERVICE)); then
    case "$PYTHON_BIN:$PY_BASE" in
        /root/* | /home/* | *:/root/* | *:/home/*)
            die "$PYTHON_BIN lives in a home folder ($PY_BASE), which the service cannot see (ProtectHome=yes).
       Use the system Python 3.11 (/usr/bin/python3.11), a deadsnakes one, or pyenv with a system root:
       sudo env PYENV_ROOT=/opt/pyenv pyenv install 3.11  -> --python /opt/pyenv/versions/3.11.*/bin/python3.11" ;;
    esac
fi
if ! "$PYTHON_BIN" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    die "$PYTHON_BIN cannot create virtual environments (Debian/Ubuntu split them out):
       sudo apt install python$PY_VERSION-venv    (or python3-venv)"
fi
[[ -f $REPO/pyproject.toml && -d $REPO/edge_runtime ]] || die "$REPO does not look like the sem-inspect source tree"
info "source: $REPO"

# ---------------------------------------------------------------------------------------------------
# 2. Virtual environment with the edge extra only
# ---------------------------------------------------------------------------------------------------
step "Virtual environment $VENV"
VPY=$VENV/bin/python
venv_home() { sed -n 's/^home *= *//p' "$VENV/pyvenv.cfg" 2>/dev/null; }
if [[ -x $VPY ]] && [[ $(python_version "$VPY" || true) == "$PY_VERSION" ]] &&
    [[ $(venv_home) == "$(dirname "$PYTHON_BIN")" ]]; then
    info "exists (Python $PY_VERSION from $(venv_home)): reusing it"
else
    if [[ -e $VENV ]]; then
        [[ -f $VENV/pyvenv.cfg ]] || die "$VENV exists and is not a virtual environment; move it away or pass --venv"
        info "exists but was made with another or a broken Python ($(venv_home || true)): recreating it"
        run rm -rf "$VENV"
    fi
    run mkdir -p "$(dirname "$VENV")"
    run "$PYTHON_BIN" -m venv "$VENV"
fi
PIP=("$VPY" -m pip --disable-pip-version-check)
WORK_DIR=$(mktemp -d)
trap 'rm -rf "$WORK_DIR"' EXIT
# pip builds a source tree in place (build/, *.egg-info): build from a copy so a checkout owned by a
# person never gets root-owned files. The copy holds what pyproject.toml packages, nothing else (no data).
SRC=$WORK_DIR/src
mapfile -t SRC_ITEMS < <("$PYTHON_BIN" "$SCRIPT_DIR/package-files.py" "$REPO/pyproject.toml")
((${#SRC_ITEMS[@]} > 1)) || die "cannot read the package list from $REPO/pyproject.toml"
mkdir -p "$SRC"
for item in "${SRC_ITEMS[@]}"; do
    [[ -e $REPO/$item ]] || die "$REPO/$item (named in pyproject.toml) is missing"
    cp -r "$REPO/$item" "$SRC/"
done
find "$SRC" -name __pycache__ -type d -prune -exec rm -rf {} +
info "building from a copy of: ${SRC_ITEMS[*]}"
run "${PIP[@]}" install --quiet --upgrade pip

step "Installing the edge runtime (pip install .[edge]: numpy, Pillow, PyYAML, LiteRT; no TensorFlow)"
install_tflite_runtime() {
    # tflite-runtime's last release (2.14) is built against numpy 1.x, for Python <= 3.11. It crashes on aarch64
    # in per-channel int8 FULLY_CONNECTED layers without a bias: bundles converted with per-channel dense
    # layers say so in their manifest and the runtime refuses them (the bundle check below fails, exit 2);
    # the default per-tensor bundles run (see deploy/README.md).
    warn "tflite-runtime 2.14 is a fallback: prefer a platform where ai-edge-litert installs (Python 3.10-3.13, glibc >= 2.27)"
    run "${PIP[@]}" install --quiet "$SRC" "numpy<2" "tflite-runtime"
}
case $RUNTIME in
    auto)
        if ! run "${PIP[@]}" install --quiet "${SRC}[edge]"; then
            warn "pip could not install ai-edge-litert for this platform; falling back to tflite-runtime with numpy<2"
            RUNTIME=tflite-runtime
            install_tflite_runtime
        fi ;;
    litert) run "${PIP[@]}" install --quiet "${SRC}[edge]" ;;
    tflite-runtime) install_tflite_runtime ;;
esac
if ((FLEET)); then
    step "Installing the fleet extra (pip install .[fleet]: paho-mqtt, prometheus-client)"
    run "${PIP[@]}" install --quiet "${SRC}[fleet]"
fi
# The same version number is re-installed from a changed checkout: force the project itself (not its deps).
run "${PIP[@]}" install --quiet --no-deps --force-reinstall "$SRC"

# ---------------------------------------------------------------------------------------------------
# 3. Does the interpreter work?
# ---------------------------------------------------------------------------------------------------
step "Checking the TFLite interpreter"
check_import() {
    # Prints the backend edge_runtime will use; fails if none imports (e.g. a wheel built for a newer glibc).
    "$VPY" -c '
import sys
from edge_runtime.interpreter import load_backend
name, cls = load_backend(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "auto" else None)
print(name, cls.__module__)' "$@"
}
if ((DRY_RUN)); then
    info "would check: $VPY -c 'from edge_runtime.interpreter import load_backend; load_backend()' (ai_edge_litert, else tflite_runtime)"
else
    if ! backend=$(check_import "$RUNTIME" 2>&1); then
        if [[ $RUNTIME == auto ]]; then
            warn "ai_edge_litert does not load here: $backend"
            warn "falling back to tflite-runtime with numpy<2"
            run "${PIP[@]}" uninstall --quiet --yes ai-edge-litert || true
            install_tflite_runtime
            RUNTIME=tflite-runtime
            backend=$(check_import "$RUNTIME" 2>&1) || die "no TFLite interpreter loads in $VENV: $backend"
        else
            die "the $RUNTIME interpreter does not load in $VENV: $backend"
        fi
    fi
    info "interpreter: $backend"
    if "$VPY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("tensorflow") is None)'; then
        warn "TensorFlow is importable in $VENV; the edge install is meant to run without it"
    fi
fi

# Runs both stages of a bundle once on a blank image with the chosen interpreter (catches a runtime that
# imports but cannot run the bundle's ops).
check_bundle() {
    local bundle=$1
    if ((DRY_RUN)); then
        info "would check: both stages of $bundle run once in $VENV"
        return 0
    fi
    local runtime_arg=$RUNTIME
    [[ $runtime_arg == auto ]] && runtime_arg=""
    "$VPY" - "$bundle" "$runtime_arg" <<'PYEOF' || die "the bundle $bundle does not run in $VENV (see the error above)"
import sys
import numpy as np
from edge_runtime.inspector import Inspector
insp = Inspector(sys.argv[1], runtime=sys.argv[2] or None)
pixels = insp.preprocess(np.zeros((64, 64), dtype=np.uint8))
insp.stage1.run(pixels)
insp.stage2.run(pixels)
print("    bundle ok:", insp.describe())
PYEOF
}

# ---------------------------------------------------------------------------------------------------
# 4. Bundle
# ---------------------------------------------------------------------------------------------------
step "Model bundle"
run mkdir -p "$MODELS_DIR"
if [[ -n $BUNDLE ]]; then
    name=$(basename "$BUNDLE")
    [[ $name == current || $name == .* ]] && die "--bundle: rename the folder (the name '$name' is reserved)"
    dest=$MODELS_DIR/$name
    if [[ -d $dest ]] && diff -rq "$BUNDLE" "$dest" >/dev/null 2>&1; then
        info "$dest is already this bundle"
    else
        tmp=$MODELS_DIR/.$name.partial
        [[ -e $tmp ]] && run rm -rf "$tmp"
        run cp -r "$BUNDLE" "$tmp"
        run chmod -R u=rwX,go=rX "$tmp"
        if [[ -e $dest ]]; then
            old=$dest.replaced-$(date +%Y%m%d-%H%M%S)
            info "keeping the previous copy as $old (delete it once the new one works)"
            run mv "$dest" "$old"
        fi
        run mv "$tmp" "$dest"
    fi
    check_bundle "$dest"
    # Atomic switch: a new symlink renamed over the old one.
    run ln -sfn "$name" "$MODELS_DIR/.current.new"
    run mv -T "$MODELS_DIR/.current.new" "$MODELS_DIR/current"
    info "current bundle: $MODELS_DIR/current -> $name"
elif [[ -e $MODELS_DIR/current ]]; then
    info "keeping the current bundle: $MODELS_DIR/current -> $(readlink "$MODELS_DIR/current" || echo '?')"
    check_bundle "$MODELS_DIR/current"
else
    warn "no bundle installed yet: pass --bundle models/NAME (the service is not started without one)"
    START=0
fi
if [[ -f $SCRIPT_DIR/README.md ]]; then
    run install -m 0644 "$SCRIPT_DIR/README.md" "$PREFIX/README.md"
fi

if ! ((WITH_SERVICE)); then
    printf '\nDone (--no-service). Try it: %s --models %s PATH...\n' "$VENV/bin/edge-inspect" "$MODELS_DIR/current"
    exit 0
fi

# ---------------------------------------------------------------------------------------------------
# 5. User and folders
# ---------------------------------------------------------------------------------------------------
step "Service user and folders"
if id -u "$SERVICE_USER" >/dev/null 2>&1; then
    info "user $SERVICE_USER exists"
else
    run useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "SEM inspection service" "$SERVICE_USER"
fi
# Root owns the top folder; the service (and people added to its group) write only inside the four below.
run install -d -m 0750 -o root -g "$SERVICE_USER" "$DATA_DIR"
# setgid: files dropped by group members stay in the group, so the service can move them.
run install -d -m 2770 -o "$SERVICE_USER" -g "$SERVICE_USER" "${STATE_DIRS[@]}"

# ---------------------------------------------------------------------------------------------------
# 6. Config and unit, rendered from the templates with this install's paths
# ---------------------------------------------------------------------------------------------------
render() {
    sed -e "s|/opt/sem-inspect/venv|$VENV|g" \
        -e "s|/opt/sem-inspect|$PREFIX|g" \
        -e "s|/var/lib/sem-inspect|$DATA_DIR|g" \
        -e "s|/etc/sem-inspect|$CONF_DIR|g" \
        -e "s|^User=sem-inspect$|User=$SERVICE_USER|" \
        -e "s|^Group=sem-inspect$|Group=$SERVICE_USER|" "$1"
}
RENDER_DIR=$WORK_DIR/render
mkdir -p "$RENDER_DIR"
render "$SCRIPT_DIR/service.yaml" >"$RENDER_DIR/service.yaml"
render "$SCRIPT_DIR/sem-inspect.service" >"$RENDER_DIR/$UNIT_NAME"

step "Service config $CONFIG_FILE"
run install -d -m 0755 "$CONF_DIR"
if [[ ! -f $CONFIG_FILE ]]; then
    run install -m 0640 -o root -g "$SERVICE_USER" "$RENDER_DIR/service.yaml" "$CONFIG_FILE"
elif cmp -s "$RENDER_DIR/service.yaml" "$CONFIG_FILE"; then
    info "unchanged"
else
    # Never overwrite a config someone edited; leave the new template beside it.
    run install -m 0640 -o root -g "$SERVICE_USER" "$RENDER_DIR/service.yaml" "$CONFIG_FILE.new"
    info "kept your edited $CONFIG_FILE; the current template is in $CONFIG_FILE.new (compare with diff)"
fi
if ((DRY_RUN)); then
    info "would check: $CONFIG_FILE with edge_runtime.config.service_config.load_service_config"
else
    "$VPY" -c 'import sys; from edge_runtime.config.service_config import load_service_config; load_service_config(sys.argv[1])' \
        "$CONFIG_FILE" || die "$CONFIG_FILE is not a valid service config (see the message above)"
    info "config ok"
    for dir in "${STATE_DIRS[@]}"; do
        runuser -u "$SERVICE_USER" -- test -w "$dir" || die "user $SERVICE_USER cannot write $dir"
    done
    if [[ -e $MODELS_DIR/current ]]; then
        runuser -u "$SERVICE_USER" -- test -r "$MODELS_DIR/current/manifest.yaml" ||
            die "user $SERVICE_USER cannot read $MODELS_DIR/current/manifest.yaml"
    fi
fi

# The board's own key signs the bundles `edge-inspect adapt` derives here (docs/security.md, "Bundles a board
# derives"); service.yaml names it with `board_key:`. Made once, never replaced.
BOARD_KEY=$CONF_DIR/board.key
step "Board key $BOARD_KEY"
if [[ -e $BOARD_KEY ]]; then
    info "exists"
elif ! "$VPY" -c 'import cryptography' >/dev/null 2>&1; then
    info "skipped: the venv has no cryptography (pip install .[signing]); adapted bundles stay unsigned"
else
    run "$VPY" -c 'import sys; from edge_runtime.signing import generate_key; generate_key(sys.argv[1], "board")' \
        "$CONF_DIR"
    run chown "$SERVICE_USER:$SERVICE_USER" "$BOARD_KEY"
    info "made (mode 0600, owner $SERVICE_USER); set board_key: $BOARD_KEY in $CONFIG_FILE to sign adaptations"
fi

step "systemd unit $UNIT_FILE"
if [[ -f $UNIT_FILE ]] && cmp -s "$RENDER_DIR/$UNIT_NAME" "$UNIT_FILE"; then
    info "unchanged"
else
    run install -m 0644 "$RENDER_DIR/$UNIT_NAME" "$UNIT_FILE"
fi
if ((FLEET)); then
    # MQTT and HTTP need IP networking, which the unit itself locks away.
    run install -D -m 0644 "$SCRIPT_DIR/fleet.conf" "$UNIT_FILE.d/fleet.conf"
fi
if ! have_systemd; then
    if ! ((DRY_RUN)); then
        warn "systemd is not running here (container or chroot?): the unit is installed but not enabled or started"
        exit 0
    fi
    info "(systemd is not running on this machine; on the board these would run:)"
fi
run systemctl daemon-reload
run systemctl enable "$UNIT_NAME"
if ((START)); then
    run systemctl restart "$UNIT_NAME"
    if ! ((DRY_RUN)); then
        sleep 5
        if systemctl is-active --quiet "$UNIT_NAME"; then
            info "running. Logs: journalctl -u ${UNIT_NAME%.service} -f"
        else
            journalctl -u "$UNIT_NAME" -n 30 --no-pager >&2 || true
            die "$UNIT_NAME did not stay up (log above). Fix it, then: sudo systemctl restart ${UNIT_NAME%.service}"
        fi
    fi
else
    info "enabled, not started (start: sudo systemctl start ${UNIT_NAME%.service})"
fi

printf '\nDone. Drop images into %s; results: %s (SQLite) and %s.\n' \
    "$DATA_DIR/incoming" "$DATA_DIR/db/results.sqlite3" "$DATA_DIR/db/results.jsonl"
printf 'Let a user drop files: sudo usermod -aG %s USER. Status: systemctl status %s\n' \
    "$SERVICE_USER" "${UNIT_NAME%.service}"
