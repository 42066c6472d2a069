# shellcheck shell=bash
# Shared set-up for scripts/serve, scripts/test and .ci/run.  Source it:
#
#   source scripts/lib.sh
#   ensure_venv         # .venv with `pip install -e '.[test]'`
#   ensure_engine       # a Docker Engine that answers /_ping (starts dockerd)
#   ensure_base_image   # $BASE_IMAGE built offline from dockerfiles/base.Dockerfile
#
# Functions return non-zero on failure (they never `exit`), so the file can
# also be sourced from an interactive shell.  Progress goes to stderr,
# prefixed with [setup].
#
# Environment knobs:
#   BUILDER_BASE_IMAGE       base image name (default builder-busybox:latest)
#   DOCKER_HOST              an engine to use instead of /var/run/docker.sock
#   BUILDER_DOCKERD_LOG      dockerd log file (default /var/log/builder-dockerd.log)
#   BUILDER_ENGINE_TIMEOUT   seconds to wait for a started dockerd (default 60)

BUILDER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

BASE_IMAGE="${BUILDER_BASE_IMAGE:-builder-busybox:latest}"
BUILDER_BASE_IMAGE="$BASE_IMAGE"
export BUILDER_BASE_IMAGE

BUILDER_DOCKERD_LOG="${BUILDER_DOCKERD_LOG:-/var/log/builder-dockerd.log}"
BUILDER_ENGINE_TIMEOUT="${BUILDER_ENGINE_TIMEOUT:-60}"

_DOCKER_SOCK=/var/run/docker.sock
_DOCKER_PIDFILE=/var/run/docker.pid
_BUSYBOX=/bin/busybox

_setup_log() { printf '[setup] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- helpers

_run_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        _setup_log "need root for: $*"
        return 1
    fi
}

_pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# _apt_install PKG...: install the packages that are missing (apt-get update
# runs at most once per shell).
_apt_install() {
    local missing=() p
    for p in "$@"; do
        _pkg_installed "$p" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        _setup_log "missing packages ${missing[*]} and no apt-get to install them"
        return 1
    fi
    if [ -z "${_BUILDER_APT_UPDATED:-}" ]; then
        _setup_log "apt-get update"
        _run_as_root env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get update -qq >/dev/null || {
            _setup_log "apt-get update failed"
            return 1
        }
        _BUILDER_APT_UPDATED=1
    fi
    _setup_log "apt-get install ${missing[*]}"
    # With recommends, as in the install this was verified against.
    _run_as_root env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get install -y -qq \
        "${missing[@]}" >/dev/null || {
        _setup_log "apt-get install ${missing[*]} failed"
        return 1
    }
}

# The docker client: Debian's (matches the engine it ships) if present, else
# whatever `docker` is on PATH.
_docker_cli() {
    if [ -x /usr/bin/docker ]; then
        echo /usr/bin/docker
    else
        command -v docker 2>/dev/null
    fi
}

_docker() {
    local cli
    cli="$(_docker_cli)" || { _setup_log "no docker client found"; return 1; }
    "$cli" "$@"
}

# _engine_ping [DOCKER_HOST value]: succeed if that engine answers.
# Empty argument means the local socket /var/run/docker.sock.
_engine_ping() {
    local host="${1:-}" cli
    if [ -z "$host" ] || [[ "$host" == unix://* ]]; then
        local sock="${host#unix://}"
        sock="${sock:-$_DOCKER_SOCK}"
        [ -S "$sock" ] || return 1
        if command -v curl >/dev/null 2>&1; then
            [ "$(curl -sS --max-time 5 --unix-socket "$sock" http://localhost/_ping 2>/dev/null)" = "OK" ]
            return
        fi
        host="unix://$sock"
    fi
    cli="$(_docker_cli)" || return 1
    DOCKER_HOST="$host" timeout 15 "$cli" version --format '{{.Server.Version}}' >/dev/null 2>&1
}

# _pid_alive PID: the process exists and is not a zombie (pgrep and kill -0
# both count zombies, e.g. a dead dockerd nobody has reaped yet).
_pid_alive() {
    local pid="$1" stat
    [ -n "$pid" ] && stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != "Z" ]
}

_pid_is_dockerd() {
    local pid="$1"
    _pid_alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "dockerd" ]
}

# First live (non-zombie) dockerd process, if any.
_running_dockerd() {
    local pid
    for pid in $(pgrep -x dockerd 2>/dev/null || true); do
        if _pid_alive "$pid"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

_dockerd_log_tail() {
    if [ -f "$BUILDER_DOCKERD_LOG" ]; then
        _setup_log "last lines of $BUILDER_DOCKERD_LOG:"
        tail -n 30 "$BUILDER_DOCKERD_LOG" | sed 's/^/[setup]   /' >&2
    fi
}

# ---------------------------------------------------------------- ensure_venv

# .venv in the repo root with the project installed editable with its test
# extra.  Reinstalls only when pyproject.toml changed since the last install
# (stamp file .venv/.installed-<sha256 of pyproject.toml>).
ensure_venv() {
    local venv="$BUILDER_ROOT/.venv" pyproject="$BUILDER_ROOT/pyproject.toml" sum stamp
    if [ ! -f "$pyproject" ]; then
        _setup_log "no pyproject.toml in $BUILDER_ROOT"
        return 1
    fi
    if [ -d "$venv" ] && ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
        _setup_log "removing broken $venv"
        rm -rf "$venv"
    fi
    if [ ! -d "$venv" ]; then
        _setup_log "creating $venv"
        python3 -m venv "$venv" || { _setup_log "python3 -m venv failed"; return 1; }
    fi
    sum="$(sha256sum "$pyproject" | cut -d' ' -f1)"
    stamp="$venv/.installed-$sum"
    if [ -f "$stamp" ]; then
        return 0
    fi
    _setup_log "pip install -e '.[test]' (pyproject.toml changed or first install)"
    rm -f "$venv"/.installed-*
    # Output is kept out of the way unless pip fails.
    local pip_log="$venv/pip-install.log"
    if ! (
        cd "$BUILDER_ROOT" &&
            PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install -q -e '.[test]'
    ) >"$pip_log" 2>&1; then
        _setup_log "pip install failed; last lines of $pip_log:"
        tail -n 30 "$pip_log" | sed 's/^/[setup]   /' >&2
        return 1
    fi
    touch "$stamp"
}

# ---------------------------------------------------------------- ensure_engine

# A Docker Engine answering ping: $DOCKER_HOST if set and alive, else the
# local /var/run/docker.sock, starting dockerd (installed from docker.io if
# missing) in the background when nothing answers.  Idempotent.
ensure_engine() {
    # The base image needs the static busybox whatever engine we end up with.
    _apt_install busybox-static || return 1

    if [ -n "${DOCKER_HOST:-}" ]; then
        if _engine_ping "$DOCKER_HOST"; then
            _setup_log "engine at DOCKER_HOST=$DOCKER_HOST answers"
            _ensure_docker_client || return 1
            return 0
        fi
        _setup_log "DOCKER_HOST=$DOCKER_HOST does not answer; using the local engine instead"
        unset DOCKER_HOST
    fi

    if _engine_ping; then
        _setup_log "engine at $_DOCKER_SOCK answers"
        _ensure_docker_client || return 1
        return 0
    fi

    _apt_install docker.io || return 1
    _start_dockerd || return 1
}

# A client to build the base image with; docker.io ships one.
_ensure_docker_client() {
    _docker_cli >/dev/null && return 0
    _apt_install docker.io
}

_start_dockerd() {
    local pid="" dockerd
    dockerd="$(command -v dockerd 2>/dev/null || echo /usr/sbin/dockerd)"
    if [ ! -x "$dockerd" ]; then
        _setup_log "dockerd not found after installing docker.io"
        return 1
    fi

    # A dockerd may already be starting up (pid file points at a live dockerd):
    # wait for it instead of starting a second one.
    if [ -f "$_DOCKER_PIDFILE" ]; then
        pid="$(tr -dc '0-9' <"$_DOCKER_PIDFILE" 2>/dev/null || true)"
        if _pid_is_dockerd "$pid"; then
            _setup_log "dockerd (pid $pid) is running but not answering yet; waiting for it"
            _wait_for_engine "$pid"
            return
        fi
        _setup_log "removing stale $_DOCKER_PIDFILE (pid ${pid:-?} is not a running dockerd)"
        _run_as_root rm -f "$_DOCKER_PIDFILE" || return 1
    fi
    if pid="$(_running_dockerd)"; then
        _setup_log "a dockerd (pid $pid) runs without answering on $_DOCKER_SOCK; waiting for it"
        _wait_for_engine "$pid"
        return
    fi
    if [ -e "$_DOCKER_SOCK" ]; then
        _setup_log "removing stale $_DOCKER_SOCK"
        _run_as_root rm -f "$_DOCKER_SOCK" || return 1
    fi

    _setup_log "starting dockerd (log: $BUILDER_DOCKERD_LOG)"
    _run_as_root mkdir -p "$(dirname "$BUILDER_DOCKERD_LOG")" || return 1
    # setsid + nohup: dockerd outlives this script and its process group.
    # Without --containerd, dockerd starts and supervises its own containerd.
    # BuildKit clips a step's output at 200 KiB/s by default ("-1" clips at once on
    # this engine): 1 GiB for both limits means a build's log is never clipped.
    export BUILDKIT_STEP_LOG_MAX_SIZE="${BUILDKIT_STEP_LOG_MAX_SIZE:-1073741824}"
    export BUILDKIT_STEP_LOG_MAX_SPEED="${BUILDKIT_STEP_LOG_MAX_SPEED:-1073741824}"
    if [ "$(id -u)" -eq 0 ]; then
        setsid nohup "$dockerd" >>"$BUILDER_DOCKERD_LOG" 2>&1 </dev/null &
        pid=$!
        disown "$pid" 2>/dev/null || true
    else
        # shellcheck disable=SC2016  # expanded by the inner sh
        sudo -n --preserve-env=BUILDKIT_STEP_LOG_MAX_SIZE,BUILDKIT_STEP_LOG_MAX_SPEED \
            sh -c 'setsid nohup "$1" >>"$2" 2>&1 </dev/null &' sh "$dockerd" "$BUILDER_DOCKERD_LOG" ||
            { _setup_log "cannot start dockerd without root"; return 1; }
        pid=""
    fi
    _wait_for_engine "$pid"
}

# _wait_for_engine PID: wait until the local socket answers ping, failing
# early if PID exits, and after $BUILDER_ENGINE_TIMEOUT seconds otherwise.
_wait_for_engine() {
    local pid="$1" start=$SECONDS
    while ! _engine_ping; do
        if [ -n "$pid" ] && ! _pid_alive "$pid" && ! _running_dockerd >/dev/null; then
            _setup_log "dockerd exited before answering on $_DOCKER_SOCK"
            _dockerd_log_tail
            return 1
        fi
        if [ $((SECONDS - start)) -ge "$BUILDER_ENGINE_TIMEOUT" ]; then
            _setup_log "dockerd did not answer on $_DOCKER_SOCK within ${BUILDER_ENGINE_TIMEOUT}s"
            _dockerd_log_tail
            return 1
        fi
        sleep 0.5
    done
    _setup_log "engine up after $((SECONDS - start))s ($(_docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}' 2>/dev/null || echo '?'))"
}

# ---------------------------------------------------------------- ensure_base_image

# Build $BASE_IMAGE from dockerfiles/base.Dockerfile if the engine lacks it.
# Fully offline: FROM scratch plus the static busybox from busybox-static.
ensure_base_image() {
    local ctx out rc
    if _docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        _setup_log "base image $BASE_IMAGE present"
        return 0
    fi
    _apt_install busybox-static || return 1
    if [ ! -x "$_BUSYBOX" ]; then
        _setup_log "$_BUSYBOX missing (busybox-static)"
        return 1
    fi
    _setup_log "building base image $BASE_IMAGE"
    ctx="$(mktemp -d)" || return 1
    if ! cp "$_BUSYBOX" "$ctx/busybox" ||
        ! cp "$BUILDER_ROOT/dockerfiles/base.Dockerfile" "$ctx/Dockerfile"; then
        rm -rf "$ctx"
        return 1
    fi
    rc=0
    out="$(DOCKER_BUILDKIT=0 _docker build --pull=false -t "$BASE_IMAGE" "$ctx" 2>&1)" || rc=$?
    rm -rf "$ctx"
    if [ "$rc" -ne 0 ]; then
        _setup_log "building $BASE_IMAGE failed:"
        printf '%s\n' "$out" | sed 's/^/[setup]   /' >&2
        return 1
    fi
    _setup_log "built $BASE_IMAGE"
}

# ensure_registry_tool: Debian's docker-registry, which the push tests run on a
# free loopback port with their own storage (tests/conftest.py starts it).
ensure_registry_tool() {
    _apt_install docker-registry || return 1
    # The package may start a system-wide instance on :5000; the tests do not use it.
    export BUILDER_REGISTRY_BIN=/usr/bin/docker-registry
}
