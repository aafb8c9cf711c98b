#!/usr/bin/env bash
# PM-Bench entry point.
#   ./run_all.sh                 regenerate every table (default profile: embedded proxy, CPU)
#   ./run_all.sh --profile P ... regenerate for profile P (smoke | default | paper), see README
#   ./run_all.sh --configs SPEC[,SPEC...] / --profile-file FILE   add configurations (e.g. a plug-in's)
#   ./run_all.sh test            run the test suite, the smoke profile and the CI regression gate
#   ./run_all.sh test [pytest args]   pytest only (PMBENCH_GATE=1: also the smoke profile + gate)
#   ./run_all.sh accept          re-measure the smoke profile and rewrite the gate's expectations
#   ./run_all.sh setup           the environment only
# All create/refresh .venv on first use; a current .venv is reused at once.
# Ctrl-C: one line, exit code 130 (finished measurements stay cached).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PMBENCH_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
LOCK="$ROOT/requirements/lock.txt"
BOOTSTRAP_VERSION=3   # bump when the install procedure below changes

log() { printf '[run_all] %s\n' "$*" >&2; }

stamp() {
    { echo "$BOOTSTRAP_VERSION"; cat "$LOCK" "$ROOT/pyproject.toml"; } | sha256sum | cut -d' ' -f1
}

bootstrap() {
    local want; want="$(stamp)"
    if [[ -x "$PY" && -f "$VENV/.pmbench-stamp" && "$(cat "$VENV/.pmbench-stamp")" == "$want" ]]; then
        return 0
    fi
    log "setting up $VENV (first use or changed requirements)"
    trap 'printf "\n[run_all] set-up interrupted; the next run resumes it\n" >&2; exit 130' INT
    local t0=$SECONDS
    [[ -x "$PY" ]] || python3 -m venv "$VENV"
    local PIP=("$PY" -m pip install --disable-pip-version-check)
    # 1) torch first, alone: anything installed before it could drag a newer CUDA torch.
    #    On CPU-only machines with a local CPU wheel pip takes that; elsewhere PyPI's build.
    "${PIP[@]}" "torch==2.13.0"
    # 2) everything but mmcv in one resolve, constrained to the lock file.
    #    setuptools<82: mmcv 2.1.0's setup.py imports pkg_resources (gone in 82).
    #    torchvision==0.28.0: the release pinned to torch 2.13; unpinned, timm pulls torch 2.15 + CUDA.
    #    ftfy, regex: imported by mmseg.utils but not declared by mmsegmentation.
    "${PIP[@]}" -c "$LOCK" "setuptools<82" torchvision==0.28.0 timm mmengine mmsegmentation \
        ftfy regex numpy pillow pandas tabulate matplotlib tqdm safetensors \
        pytest pytest-benchmark pytest-xdist fvcore
    # 3) full mmcv 2.1.0 with compiled ops (mmseg.models imports mmcv.ops; mmcv-lite does not work).
    if "$PY" -c "import mmcv, mmcv.ops" >/dev/null 2>&1; then
        :
    elif "${PIP[@]}" -c "$LOCK" --only-binary=mmcv "mmcv==2.1.0" 2>/dev/null; then
        log "mmcv 2.1.0 installed from a prebuilt wheel"
    else
        log "NOTICE: no prebuilt mmcv 2.1.0 wheel for this torch/python; compiling mmcv with ops"
        log "NOTICE: this takes ~15 minutes on 2 cores (set PIP_FIND_LINKS to a folder with a wheel to skip it)"
        MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${PIP[@]}" -c "$LOCK" --no-build-isolation "mmcv==2.1.0"
    fi
    # 4) the suite itself, editable, without touching the resolved set.
    "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT" >/dev/null
    # 5) torchvision-on-CPU-torch import fix, active in every interpreter of the venv
    #    (pytest, torchrun workers, mmengine runners); see pmbench_tvshim.py for why.
    local SP; SP="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "import pmbench_tvshim; pmbench_tvshim.install_hook()" > "$SP/pmbench_tvshim.pth"
    "$PY" -c "import torch, torchvision, timm, mmcv, mmcv.ops, mmengine, mmseg, bench" \
        || { log "environment check failed"; exit 1; }
    "$PY" -m pip freeze --exclude-editable > "$VENV/pip-freeze.txt"
    echo "$want" > "$VENV/.pmbench-stamp"
    log "environment ready in $((SECONDS - t0)) s"
    trap - INT
}

cmd="${1:-}"
case "$cmd" in
    test)
        shift
        bootstrap
        cd "$ROOT"
        exec "$PY" -m bench.entry testrun "$@"
        ;;
    setup)
        bootstrap
        ;;
    accept)
        # Re-measure the smoke profile and rewrite the CI gate's expectations (review the diff!).
        bootstrap
        cd "$ROOT"
        "$PY" -m bench.entry orchestrate --profile smoke --force --out "$ROOT/.cache/reports/smoke"
        exec "$PY" -m bench.entry gate "$ROOT/.cache/reports/smoke" --accept
        ;;
    *)
        bootstrap
        cd "$ROOT"
        exec "$PY" -m bench.entry orchestrate "$@"
        ;;
esac
