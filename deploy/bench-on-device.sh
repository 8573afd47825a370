#!/usr/bin/env bash
# Run `python -m benchmarks` on a board over ssh and bring the results back.
#
#   deploy/bench-on-device.sh pi@raspberrypi.local models/demo
#   deploy/bench-on-device.sh --images data/test jetson models/demo -- --threads 1,2,4 --runs 100
#
# Copies the project source (what pyproject.toml packages) and the bundle to the board, makes (once) a
# virtual environment there with `pip install .[edge]` (no TensorFlow; re-used next time, re-synced only when
# pyproject.toml changed), runs the benchmark there, and copies results.json, results.md and the plots into
# a local folder. Needs key-based ssh to HOST (ssh-copy-id HOST) and Python 3.10 to 3.13 on the board.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

HOST=""
BUNDLE=""
IMAGES=""
OUT=""
REMOTE_DIR=sem-inspect-bench
REMOTE_PYTHON=python3
DRY_RUN=0
FORCE_TAR=0
BENCH_ARGS=()

usage() {
    cat <<EOF
Usage: $0 [options] HOST [BUNDLE] [-- BENCHMARK-ARGS...]

  HOST                  ssh destination (user@board, or a Host from ~/.ssh/config)
  BUNDLE                model bundle folder (default: models/demo)
  BENCHMARK-ARGS        passed to python -m benchmarks (e.g. --threads 1,2,4 --runs 100)

Options:
  --images DIR          labelled images (DIR/<class>/*.png) to copy for the end-to-end benchmark
  --out DIR             local folder for the results (default: reports/bench-HOST-DATE)
  --remote-dir DIR      working folder on the board, relative to the remote home (default: $REMOTE_DIR)
  --python NAME         Python on the board (default: $REMOTE_PYTHON)
  --tar                 copy with tar over ssh even where rsync is available
  --dry-run             print the commands instead of running them
  -h, --help            this help
EOF
}

info() { printf '==> %s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

positional=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --images) need_value "$@"; IMAGES=$2; shift 2 ;;
        --out) need_value "$@"; OUT=$2; shift 2 ;;
        --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
        --python) need_value "$@"; REMOTE_PYTHON=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --tar) FORCE_TAR=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; BENCH_ARGS=("$@"); break ;;
        -*) usage >&2; die "unknown option: $1 (benchmark options go after --)" ;;
        *) positional+=("$1"); shift ;;
    esac
done
[[ ${#positional[@]} -ge 1 && ${#positional[@]} -le 2 ]] || { usage >&2; die "give HOST and optionally BUNDLE"; }
HOST=${positional[0]}
BUNDLE=${positional[1]:-$REPO/models/demo}
[[ -f $BUNDLE/manifest.yaml ]] || die "$BUNDLE is not a model bundle (no manifest.yaml); make one with python -m convert"
BUNDLE=$(cd "$BUNDLE" && pwd)
BUNDLE_NAME=$(basename "$BUNDLE")
if [[ -n $IMAGES ]]; then
    [[ -d $IMAGES ]] || die "--images: $IMAGES is not a folder"
    IMAGES=$(cd "$IMAGES" && pwd)
fi
[[ $REMOTE_DIR =~ ^[A-Za-z0-9._/~-]+$ ]] || die "--remote-dir: use only letters, digits and . _ - / ~"
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$REPO/reports/bench-${HOST##*@}-$STAMP}

# What pyproject.toml packages (plus pyproject.toml and the readme): the board gets no data or runs.
mapfile -t SRC_ITEMS < <(python3 "$SCRIPT_DIR/package-files.py" "$REPO/pyproject.toml")
((${#SRC_ITEMS[@]} > 1)) || die "cannot read the package list from $REPO/pyproject.toml"

SSH=(ssh -o BatchMode=yes -o ConnectTimeout=15)

# Print a command; run it unless --dry-run.
run() {
    printf '    +'
    printf ' %q' "$@"
    printf '\n'
    ((DRY_RUN)) || "$@"
}

# Run a script on the board with bash, arguments quoted safely.
remote() {
    local script=$1
    shift
    run "${SSH[@]}" "$HOST" "bash -s --$(printf ' %q' "$@")" <<<"$script"
}

info "checking ssh to $HOST"
if ! ((DRY_RUN)) && ! "${SSH[@]}" "$HOST" true; then
    die "cannot ssh to $HOST without a password. Set up a key first: ssh-copy-id $HOST"
fi

USE_RSYNC=0
if ! ((FORCE_TAR)) && command -v rsync >/dev/null 2>&1 && { ((DRY_RUN)) || "${SSH[@]}" "$HOST" 'command -v rsync' >/dev/null 2>&1; }; then
    USE_RSYNC=1
fi

# Copy FOLDER's contents (or the named items in it) to REMOTE_DIR/DEST on the board, replacing what was there.
push() {
    local src=$1 dest=$2
    shift 2
    local items=("$@")
    [[ ${#items[@]} -gt 0 ]] || items=(.)
    if ((USE_RSYNC)); then
        run "${SSH[@]}" "$HOST" "mkdir -p $(printf '%q' "$REMOTE_DIR/$dest")"
        (cd "$src" && run rsync -az --delete --exclude __pycache__ --exclude '*.pyc' -e "${SSH[*]}" \
            "${items[@]}" "$HOST:$REMOTE_DIR/$dest/")
    else
        local q
        q=$(printf '%q' "$REMOTE_DIR/$dest")
        if ((DRY_RUN)); then
            printf '    + tar -C %q -cf - %s | ssh %s "rm -rf %s && mkdir -p %s && tar -C %s -xf -"\n' \
                "$src" "${items[*]}" "$HOST" "$q" "$q" "$q"
        else
            tar -C "$src" --exclude __pycache__ --exclude '*.pyc' -cf - "${items[@]}" |
                "${SSH[@]}" "$HOST" "rm -rf $q && mkdir -p $q && tar -C $q -xf -"
        fi
    fi
}

info "copying the source (${SRC_ITEMS[*]}) and bundle $BUNDLE_NAME to $HOST:$REMOTE_DIR ($( ((USE_RSYNC)) && echo rsync || echo tar over ssh))"
push "$REPO" src "${SRC_ITEMS[@]}"
push "$BUNDLE" "bundles/$BUNDLE_NAME"
if [[ -n $IMAGES ]]; then
    info "copying images from $IMAGES"
    push "$IMAGES" images
fi

info "setting up the virtual environment on $HOST (re-used when pyproject.toml is unchanged)"
# shellcheck disable=SC2016  # expanded on the board, not here
SETUP='set -euo pipefail
dir=$1 python=$2
cd "$dir"
command -v "$python" >/dev/null || { echo "ERROR: $python not found on $(hostname); see deploy/README.md (Python 3.10 to 3.13)" >&2; exit 2; }
if [[ ! -x venv/bin/python ]]; then
    "$python" -m venv venv || { echo "ERROR: cannot create a venv: sudo apt install python3-venv" >&2; exit 2; }
fi
want=$(sha256sum src/pyproject.toml | cut -d" " -f1)
if [[ $(cat venv/.pyproject.sha256 2>/dev/null) != "$want" ]]; then
    venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    venv/bin/python -m pip install --quiet --disable-pip-version-check "./src[edge]"
    echo "$want" > venv/.pyproject.sha256
fi
venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall ./src
venv/bin/python -c "from edge_runtime.interpreter import load_backend; print(\"    interpreter:\", load_backend()[0])"'
remote "$SETUP" "$REMOTE_DIR" "$REMOTE_PYTHON"

info "running the benchmark on $HOST (progress below)"
bench=(venv/bin/python -m benchmarks --models "bundles/$BUNDLE_NAME" --out "results/$STAMP")
[[ -n $IMAGES ]] && bench+=(--images images)
bench+=("${BENCH_ARGS[@]}")
# shellcheck disable=SC2016  # expanded on the board, not here
RUN='set -euo pipefail
cd "$1"
shift
"$@"'
remote "$RUN" "$REMOTE_DIR" "${bench[@]}"

info "fetching the results into $OUT"
run mkdir -p "$OUT"
if ((USE_RSYNC)); then
    run rsync -az -e "${SSH[*]}" "$HOST:$REMOTE_DIR/results/$STAMP/" "$OUT/"
else
    q=$(printf '%q' "$REMOTE_DIR/results/$STAMP")
    if ((DRY_RUN)); then
        printf '    + ssh %s "tar -C %s -cf - ." | tar -C %q -xf -\n' "$HOST" "$q" "$OUT"
    else
        "${SSH[@]}" "$HOST" "tar -C $q -cf - ." | tar -C "$OUT" -xf -
    fi
fi
if ! ((DRY_RUN)); then
    for f in results.json results.md; do
        [[ -f $OUT/$f ]] || die "$f did not come back from $HOST (see the output above)"
    done
fi
printf '\nResults from %s: %s/results.md (table), %s/results.json\n' "$HOST" "$OUT" "$OUT"
