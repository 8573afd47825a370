#!/usr/bin/env bash
# arm64 smoke test without a board: run edge-inspect with an aarch64 Python (Debian 12: 3.11, Debian 13: 3.13, as
# Raspberry Pi OS has them) under qemu user-mode emulation, on the project's source, with the aarch64 wheels a
# board would get.
#
#   deploy/arm64-smoke.sh [options] -- EDGE-INSPECT-ARGS...
#   deploy/arm64-smoke.sh -- --models models/demo --json data/some-images/
#   deploy/arm64-smoke.sh --suite trixie -- --models models/demo data/some-images/      # Python 3.13
#   deploy/arm64-smoke.sh --exec -- -m convert.parity_worker ...                        # any Python arguments
#
# What it builds, once per suite, under --cache (default ~/.cache/sem-inspect-arm64), re-used afterwards:
#   root/, root-trixie/
#                 Debian 12 (bookworm) / 13 (trixie) arm64 packages (python3.X-minimal, libpython3.X-stdlib,
#                 libc6, ...) fetched with apt-get download into a private apt state (the host's dpkg is not
#                 touched, no root, binfmt or chroot needed) and unpacked with dpkg -x
#   site-*/       aarch64 wheels (pip download --platform manylinux..._aarch64 --only-binary=:all:) unzipped
#   qemu-trixie/  only with --qemu trixie: Debian 13's qemu-user (10.x, a static binary) unpacked
# Then: qemu-aarch64 -cpu CPU -L root root/usr/bin/python3.X -m edge_runtime.cli ARGS, with
# PYTHONPATH=<repo>:site-*. Its stdout is edge-inspect's; this script's messages go to stderr.
#
# Debian packages come from the Debian archive this machine's apt is configured with (/etc/apt/sources.list
# and sources.list.d, one-line or deb822; so a fab's internal mirror is used as it is), the same archive for
# the other suite; --mirror / --security-mirror override it, and deb.debian.org is the fallback when the
# host's sources name no Debian archive (an Ubuntu host).
#
# Why root/proc/cpuinfo (measured, see deploy/README.md): ai-edge-litert >= 2.2.0 calls cpuinfo_initialize()
# while building the interpreter, and cpuinfo_arm_linux_init() crashes (SIGSEGV) parsing the *host's* x86
# /proc/cpuinfo, which qemu 7.2 user mode passes through (qemu >= 8.1 emulates the file). qemu -L serves
# root/proc/cpuinfo instead, so this script writes an ARM one matching --cpu there; --no-fake-cpuinfo
# shows the crash. tflite-runtime 2.14 crashes elsewhere (see --runtime).
#
# Exit status: edge-inspect's own; 77 when this machine cannot run the test (no qemu, not Debian/apt,
# offline): the reason is printed, and tests skip on it; 2 on a packaging failure (no aarch64 wheel for a
# dependency: a board could not install it either), and tests fail on it.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/sem-inspect-arm64
QEMU=auto
CPU=cortex-a72
RUNTIME=litert
LITERT_SPEC=""
PYTHON=${PYTHON:-python3}
MIRROR=""
SECURITY_MIRROR=""
DEFAULT_MIRROR=http://deb.debian.org/debian
DEFAULT_SECURITY_MIRROR=http://deb.debian.org/debian-security
SUITE=bookworm
EXEC=0
SETUP_ONLY=0
REBUILD=0
ARGS=()

# Per suite: the aarch64 Python, its glibc (the newest manylinux tag its wheels may have) and the shared
# libraries Python and the wheels load. Debian 13 renamed some libraries in the 64-bit time_t transition (t64).
declare -A PY_OF=([bookworm]=3.11 [trixie]=3.13)
declare -A GLIBC_OF=([bookworm]=36 [trixie]=41)
declare -A DEBIAN_OF=([bookworm]=12 [trixie]=13)
declare -A ROOT_DIR_OF=([bookworm]=root [trixie]=root-trixie)
declare -A APT_DIR_OF=([bookworm]=apt [trixie]=apt-trixie)
deb_packages() {
    local py=python$1
    case $2 in
        bookworm) printf '%s\n' "$py-minimal" "lib$py-minimal" "lib$py-stdlib" libc6 libssl3 zlib1g libexpat1 \
            libffi8 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1 \
            libgcc-s1 libstdc++6 libzstd1 media-types ;;
        trixie) printf '%s\n' "$py-minimal" "lib$py-minimal" "lib$py-stdlib" libc6 libssl3t64 zlib1g libexpat1 \
            libffi8 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8t64 libuuid1 libcrypt1 \
            libgcc-s1 libstdc++6 libzstd1 media-types libmpdec4 ;;
    esac
}
# What pyproject.toml's edge extra asks for (the version a board gets).
LITERT_DEFAULT="ai-edge-litert>=2.0,<3"
# What pip prints when it cannot reach the index (then the test skips); any other failure to download is a
# packaging failure (then it fails).
NETWORK_ERRORS='NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|Network is unreachable|No route to host|Connection refused|ConnectTimeout|Read timed out|ProxyError|SSLError|CERTIFICATE_VERIFY_FAILED'
FAKE_CPUINFO=1
# tflite-runtime's last release is built against numpy 1.x.
TFLITE_SPECS=("tflite-runtime==2.14.0" "numpy<2")

usage() {
    cat <<EOF
Usage: $0 [options] [-- EDGE-INSPECT-ARGS...]

Options:
  --cache DIR         where the arm64 root, wheels and apt state live (default: $CACHE)
  --suite NAME        bookworm (Debian 12, Python 3.11; default) or trixie (Debian 13, Python 3.13)
  --mirror URL        Debian archive (default: the one this machine's apt sources use, else $DEFAULT_MIRROR)
  --security-mirror URL
                      Debian security archive (default: the host's, if it has one configured; none: skipped)
  --qemu PATH|auto|trixie
                      qemu-aarch64 binary; auto = qemu-aarch64-static or qemu-aarch64 on PATH;
                      trixie = fetch Debian 13's qemu-user (10.x) into the cache and use it
  --cpu MODEL         emulated CPU (default: $CPU, the Raspberry Pi 4's core; e.g. cortex-a76 = Pi 5)
  --runtime NAME      litert (default) or tflite-runtime (2.14 + numpy<2)
  --litert SPEC       ai-edge-litert requirement (default: $LITERT_DEFAULT, as pyproject.toml's edge extra)
  --no-fake-cpuinfo   let the guest read the host's /proc/cpuinfo (qemu < 8.1 then crashes LiteRT >= 2.2)
  --python PATH       host Python with pip, to download the wheels (default: \$PYTHON or python3)
  --exec              pass the arguments after -- to the aarch64 Python instead of edge-inspect
                      (e.g. -m convert.parity_worker ..., for python -m convert check --python)
  --setup-only        build the cache and print the versions, run nothing
  --rebuild           delete the cache first
  -h, --help          this help
EOF
}

say() { printf '[arm64-smoke] %s\n' "$*" >&2; }
cannot() { printf '[arm64-smoke] cannot run here: %s\n' "$*" >&2; exit 77; }
die() { printf '[arm64-smoke] ERROR: %s\n' "$*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --cache) need_value "$@"; CACHE=$2; shift 2 ;;
        --suite) need_value "$@"; SUITE=$2; shift 2 ;;
        --mirror) need_value "$@"; MIRROR=$2; shift 2 ;;
        --security-mirror) need_value "$@"; SECURITY_MIRROR=$2; shift 2 ;;
        --exec) EXEC=1; shift ;;
        --qemu) need_value "$@"; QEMU=$2; shift 2 ;;
        --cpu) need_value "$@"; CPU=$2; shift 2 ;;
        --runtime) need_value "$@"; RUNTIME=$2; shift 2 ;;
        --litert) need_value "$@"; LITERT_SPEC=$2; shift 2 ;;
        --python) need_value "$@"; PYTHON=$2; shift 2 ;;
        --no-fake-cpuinfo) FAKE_CPUINFO=0; shift ;;
        --setup-only) SETUP_ONLY=1; shift ;;
        --rebuild) REBUILD=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; ARGS=("$@"); break ;;
        *) usage >&2; die "unknown option: $1 (edge-inspect arguments go after --)" ;;
    esac
done
case $RUNTIME in litert | tflite-runtime) ;; *) die "--runtime must be litert or tflite-runtime" ;; esac
[[ -n ${PY_OF[$SUITE]:-} ]] || die "--suite must be bookworm or trixie"
PYV=${PY_OF[$SUITE]}
mapfile -t DEB_PACKAGES < <(deb_packages "$PYV" "$SUITE")
((SETUP_ONLY)) || ((${#ARGS[@]})) || die "give edge-inspect arguments after -- (or --setup-only)"

for tool in apt-get dpkg flock; do
    command -v "$tool" >/dev/null 2>&1 || cannot "$tool is missing (a Debian/Ubuntu host is needed to fetch Debian's arm64 packages)"
done
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -r $KEYRING ]] || cannot "$KEYRING is missing (apt-get install debian-archive-keyring)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || cannot "$PYTHON has no pip (pass --python or PYTHON=.../python)"

# --- which Debian archive -----------------------------------------------------------------------------
# The host's apt sources (the files apt-config names; APT_CONFIG is honoured): the first Debian archive and
# Debian security archive configured there. Prints "MIRROR<tab>SECURITY<tab>WHERE" (SECURITY may be "-").
host_debian_archives() {
    eval "$(apt-config shell LIST Dir::Etc::sourcelist/f PARTS Dir::Etc::sourceparts/d)"
    "$PYTHON" - "${LIST:-/etc/apt/sources.list}" "${PARTS:-/etc/apt/sources.list.d}" <<'PYEOF'
import glob, os, re, sys
listfile, parts = sys.argv[1], sys.argv[2]
DEBIAN = re.compile(r"^(buster|bullseye|bookworm|trixie|forky|duke|sid|(old)*stable|testing|unstable)(-updates|-backports|-security|/updates)?$")
found = []          # (uri, suite, file)
def one_line(path):
    for line in open(path, encoding="utf-8", errors="replace"):
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb":
            found.append((line[1], line[2], path))
def deb822(path):
    for para in re.split(r"\n\s*\n", open(path, encoding="utf-8", errors="replace").read()):
        fields = {}
        for line in para.splitlines():
            if line and not line[0].isspace() and not line.startswith("#") and ":" in line:
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0].lower() != "no":
            found.extend((uri, suite, path) for uri in fields.get("uris", []) for suite in fields.get("suites", []))
if os.path.isfile(listfile):
    one_line(listfile)
for path in sorted(glob.glob(os.path.join(parts, "*.list"))):
    one_line(path)
for path in sorted(glob.glob(os.path.join(parts, "*.sources"))):
    deb822(path)
debian = [(u.rstrip("/"), s, f) for u, s, f in found if DEBIAN.match(s)]
main = next(((u, f) for u, s, f in debian if not s.endswith(("-security", "/updates"))), None)
security = next((u for u, s, f in debian if s.endswith(("-security", "/updates"))), "-")
if main:
    print(f"{main[0]}\t{security}\t{main[1]}")
PYEOF
}
if [[ -n $MIRROR ]]; then
    MIRROR_FROM="--mirror"
    SECURITY_MIRROR=${SECURITY_MIRROR:--}
else
    IFS=$'\t' read -r host_mirror host_security host_file < <(host_debian_archives || true) || true
    if [[ -n ${host_mirror:-} ]]; then
        MIRROR=$host_mirror
        MIRROR_FROM="this machine's apt sources, $host_file"
        SECURITY_MIRROR=${SECURITY_MIRROR:-$host_security}
    else
        MIRROR=$DEFAULT_MIRROR
        MIRROR_FROM="default: this machine's apt sources name no Debian archive"
        SECURITY_MIRROR=${SECURITY_MIRROR:-$DEFAULT_SECURITY_MIRROR}
    fi
fi
say "Debian archive: $MIRROR ($MIRROR_FROM); security: $([[ $SECURITY_MIRROR == - ]] && echo "none" || echo "$SECURITY_MIRROR")"

if ((REBUILD)); then
    say "removing $CACHE"
    rm -rf "$CACHE"
fi
mkdir -p "$CACHE"
# One run at a time per cache (parallel test runs): root/proc/cpuinfo is written per run.
exec 9>"$CACHE/.lock"
flock 9

# A private apt state for a foreign architecture or suite: reads the host's apt.conf (proxies), nothing else.
apt_private() {
    local dir=$1 arch=$2
    shift 2
    apt-get -q -o "APT::Architecture=$arch" -o "APT::Architectures::=$arch" \
        -o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=$dir/sources.list.d" \
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "Dir::State::status=$dir/status" \
        -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root" "$@"
}

apt_setup() {
    local dir=$1 arch=$2 sources=$3
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/sources.list.d" "$dir/debs"
    : >"$dir/status"
    printf '%s\n' "$sources" >"$dir/sources.list"
    # Lists older than a week are refreshed (security updates replace package versions).
    if [[ -z $(find "$dir/lists" -maxdepth 1 -name '*Packages*' -mtime -7 -print -quit) ]]; then
        apt_private "$dir" "$arch" update >"$dir/update.log" 2>&1 ||
            cannot "apt-get update for $arch failed (offline?); see $dir/update.log"
    fi
}

# --- qemu ---------------------------------------------------------------------------------------------
if [[ $QEMU == trixie ]]; then
    QDIR=$CACHE/qemu-trixie
    if [[ ! -x $QDIR/root/usr/bin/qemu-aarch64 ]]; then
        say "fetching Debian 13 (trixie) qemu-user into $QDIR"
        host_arch=$(dpkg --print-architecture)
        apt_setup "$QDIR/apt" "$host_arch" "deb [signed-by=$KEYRING] $MIRROR trixie main"
        (cd "$QDIR/apt/debs" && apt_private "$QDIR/apt" "$host_arch" download qemu-user) \
            >"$QDIR/download.log" 2>&1 || cannot "apt-get download qemu-user (trixie) failed; see $QDIR/download.log"
        rm -rf "$QDIR/root.partial"
        dpkg -x "$(ls "$QDIR"/apt/debs/qemu-user_*.deb)" "$QDIR/root.partial"
        rm -rf "$QDIR/root"
        mv "$QDIR/root.partial" "$QDIR/root"
    fi
    QEMU=$QDIR/root/usr/bin/qemu-aarch64
elif [[ $QEMU == auto ]]; then
    QEMU=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
    [[ -n $QEMU ]] || cannot "qemu-aarch64-static is not installed (apt-get install qemu-user-static)"
fi
[[ -x $QEMU ]] || cannot "$QEMU is not an executable qemu"
QEMU_VERSION=$("$QEMU" --version | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | head -n1)
[[ -n $QEMU_VERSION ]] || die "cannot read the version of $QEMU"
LITERT_SPEC=${LITERT_SPEC:-$LITERT_DEFAULT}

# --- aarch64 wheels -----------------------------------------------------------------------------------
# The project's own dependencies (numpy, Pillow, PyYAML) from pyproject.toml, plus the interpreter.
mapfile -t REQS < <("$PYTHON" - "$REPO/pyproject.toml" <<'PYEOF'
import sys, tomllib
with open(sys.argv[1], "rb") as fh:
    print("\n".join(tomllib.load(fh)["project"]["dependencies"]))
PYEOF
)
((${#REQS[@]})) || die "cannot read the dependencies from $REPO/pyproject.toml"
if [[ $RUNTIME == litert ]]; then REQS+=("$LITERT_SPEC"); else REQS+=("${TFLITE_SPECS[@]}"); fi
SITE_KEY=$(printf '%s\n' "${REQS[@]}" "python $PYV" "glibc ${GLIBC_OF[$SUITE]}" | sha256sum | cut -c1-16)
SITE=$CACHE/site-$RUNTIME-$SITE_KEY
if [[ ! -f $SITE/.complete ]]; then
    say "downloading aarch64 wheels into $SITE: ${REQS[*]}"
    # Wheels for the suite's glibc (Debian 12: 2.36, Debian 13: 2.41); pip wants each manylinux tag spelled out.
    platforms=(--platform manylinux2014_aarch64)
    for minor in $(seq 17 "${GLIBC_OF[$SUITE]}"); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
    rm -rf "$SITE.partial" "$SITE.wheels"
    if ! "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --implementation cp \
        --python-version "$PYV" "${platforms[@]}" --dest "$SITE.wheels" "${REQS[@]}" >"$CACHE/pip-download.log" 2>&1; then
        # Offline is this machine's limit (skip); a missing aarch64 wheel is a packaging failure a board would
        # hit too (fail).
        if grep -qiE "$NETWORK_ERRORS" "$CACHE/pip-download.log"; then
            cannot "pip cannot reach the package index (offline?); see $CACHE/pip-download.log"
        fi
        why=$(grep -m1 -iE 'no matching distribution|could not find a version' "$CACHE/pip-download.log" ||
            tail -n1 "$CACHE/pip-download.log")
        die "packaging failure, a board could not install this either: no aarch64 wheel (CPython $PYV," \
            "glibc <= 2.${GLIBC_OF[$SUITE]}) for ${REQS[*]}: $why (see $CACHE/pip-download.log)"
    fi
    mkdir -p "$SITE.partial"
    for wheel in "$SITE.wheels"/*.whl; do
        "$PYTHON" -m zipfile -e "$wheel" "$SITE.partial/"
    done
    rm -rf "$SITE.wheels"
    touch "$SITE.partial/.complete"
    mv "$SITE.partial" "$SITE"
fi

# --- aarch64 Python root ------------------------------------------------------------------------------
ROOT=$CACHE/${ROOT_DIR_OF[$SUITE]}
APT=$CACHE/${APT_DIR_OF[$SUITE]}
ROOT_KEY=$(printf '%s\n' "$MIRROR" "${DEB_PACKAGES[@]}" merged-usr-links | sha256sum | cut -c1-16)
if [[ $(cat "$ROOT/.complete" 2>/dev/null) != "$ROOT_KEY" ]]; then
    say "building the arm64 Python $PYV root in $ROOT (Debian ${DEBIAN_OF[$SUITE]} packages from $MIRROR)"
    sources="deb [signed-by=$KEYRING] $MIRROR $SUITE main
deb [signed-by=$KEYRING] $MIRROR $SUITE-updates main"
    [[ $SECURITY_MIRROR == - ]] || sources+="
deb [signed-by=$KEYRING] $SECURITY_MIRROR $SUITE-security main"
    apt_setup "$APT" arm64 "$sources"
    rm -f "$APT"/debs/*.deb
    (cd "$APT/debs" && apt_private "$APT" arm64 download "${DEB_PACKAGES[@]}") \
        >"$APT/download.log" 2>&1 || cannot "apt-get download of the arm64 packages failed; see $APT/download.log"
    rm -rf "$ROOT.partial"
    mkdir -p "$ROOT.partial"
    for deb in "$APT"/debs/*.deb; do
        dpkg -x "$deb" "$ROOT.partial"
    done
    # Debian 13 is merged-/usr (libc6's loader is in /usr/lib; base-files makes /lib a link): do what it does.
    for dir in bin sbin lib; do
        [[ -e $ROOT.partial/$dir ]] || ln -s "usr/$dir" "$ROOT.partial/$dir"
    done
    printf '%s\n' "$ROOT_KEY" >"$ROOT.partial/.complete"
    rm -rf "$ROOT"
    mv "$ROOT.partial" "$ROOT"
fi
[[ -x $ROOT/usr/bin/python$PYV ]] || die "$ROOT/usr/bin/python$PYV is missing after the build (try --rebuild)"

# An ARM /proc/cpuinfo for the emulated core (MIDR part numbers), one entry per host CPU so that
# os.cpu_count() and cpuinfo agree.
case $CPU in
    cortex-a53) part=0xd03 ;; cortex-a57) part=0xd07 ;; cortex-a76) part=0xd0b ;;
    neoverse-n1) part=0xd0c ;; *) part=0xd08 ;; # cortex-a72 (Raspberry Pi 4) and anything else
esac
rm -f "$ROOT/proc/cpuinfo"
if ((FAKE_CPUINFO)); then
    mkdir -p "$ROOT/proc"
    for ((i = 0; i < $(nproc); i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: 3\n\n' "$part"
    done >"$ROOT/proc/cpuinfo"
fi

# --- run ----------------------------------------------------------------------------------------------
# Only this environment: no host PYTHONHOME/user site; bytecode cached outside the checkout.
run_arm64() {
    env -u PYTHONHOME -u PYTHONSTARTUP PYTHONPATH="$REPO:$SITE" PYTHONNOUSERSITE=1 \
        PYTHONPYCACHEPREFIX="$CACHE/pycache" TF_CPP_MIN_LOG_LEVEL=3 \
        "$QEMU" -cpu "$CPU" -L "$ROOT" "$ROOT/usr/bin/python$PYV" -s "$@"
}
VERSIONS=$(run_arm64 -c '
import platform, sys, numpy
from edge_runtime.interpreter import load_backend
from importlib import metadata
name, cls = load_backend(sys.argv[1])
dist = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime"}[name]
print(f"python {platform.python_version()} {platform.machine()}, numpy {numpy.__version__}, {dist} {metadata.version(dist)}")
' "$RUNTIME") || die "the aarch64 Python cannot load the $RUNTIME interpreter (see above)"
say "qemu $QEMU_VERSION ($QEMU) -cpu $CPU, Debian ${DEBIAN_OF[$SUITE]} ($SUITE): $VERSIONS"
((SETUP_ONLY)) && exit 0
set +e
if ((EXEC)); then
    run_arm64 "${ARGS[@]}"
else
    run_arm64 -m edge_runtime.cli --runtime "$RUNTIME" "${ARGS[@]}"
fi
status=$?
set -e
if ((status >= 128)); then
    say "the aarch64 process died with signal $((status - 128)) under qemu $QEMU_VERSION -cpu $CPU"
fi
exit "$status"
