# shellcheck shell=bash
# Shared set-up for scripts/serve, scripts/test and .ci/run.  Source it:
#
#   source scripts/lib.sh
#   ensure_venv         # .venv with `pip install -e '.[test]'`
#   ensure_oldest_venv  # .venv-oldest: runtime dependencies at their lower bounds (run_oldest_unit_tests)
#   run_static_checks   # ruff check, ruff format --check, mypy
#   ensure_engine       # a Docker Engine that answers /_ping (starts dockerd)
#   ensure_base_image   # $BASE_IMAGE built offline from dockerfiles/base.Dockerfile
#   ensure_second_engine  # a second dockerd (own roots, socket, bridge) with $BASE_IMAGE;
#                         # exports BUILDER_SECOND_DOCKER_HOST (stop_second_engine stops it)
#   ensure_registry_tool, ensure_redis_tool, ensure_nginx_tool  # binaries the tests run
#
# Functions return non-zero on failure (they never `exit`), so the file can
# also be sourced from an interactive shell.  Progress goes to stderr,
# prefixed with [setup].
#
# Environment knobs:
#   BUILDER_BASE_IMAGE       base image name (default builder-busybox:latest)
#   DOCKER_HOST              an engine to use instead of /var/run/docker.sock
#   BUILDER_DOCKERD_LOG      dockerd log file (default /var/log/builder-dockerd.log)
#   BUILDER_DOCKERD2_LOG     second dockerd's log (default /var/log/builder-dockerd2.log)
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

# _buildkit_answers SOCKET: the engine's BuildKit finishes a build of `FROM scratch` within
# 20 s.  Its BuildKit (20.10) can deadlock for good when a client vanishes in the middle of a
# build (its status sender blocks on a channel nobody reads): the engine still answers ping,
# but every BuildKit build on it hangs until dockerd restarts.
_buildkit_answers() {
    local sock="$1" dir answer
    command -v curl >/dev/null 2>&1 || return 0  # no way to ask here: assume it answers
    dir="$(mktemp -d)" || return 1
    printf 'FROM scratch\nLABEL builder.probe=1\n' >"$dir/Dockerfile"
    tar -C "$dir" -cf "$dir/context.tar" Dockerfile
    answer="$(curl -sS --max-time 20 --unix-socket "$sock" -X POST -H 'Content-Type: application/x-tar' \
        --data-binary @"$dir/context.tar" "http://localhost/v1.41/build?version=2&buildid=builder-probe-$$-$RANDOM" \
        2>/dev/null)"
    rm -rf "$dir"
    [[ "$answer" == *'"moby.image.id"'* ]]
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

# First live (non-zombie) dockerd process of the default engine, if any: one
# with an --exec-root of its own (the second engine) is another engine.
_running_dockerd() {
    local pid
    for pid in $(pgrep -x dockerd 2>/dev/null || true); do
        if _pid_alive "$pid" && ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- '--exec-root'; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

# _dockerd_log_tail [LOG]: the end of a dockerd log (default: the main engine's).
_dockerd_log_tail() {
    local log="${1:-$BUILDER_DOCKERD_LOG}"
    if [ -f "$log" ]; then
        _setup_log "last lines of $log:"
        tail -n 30 "$log" | sed 's/^/[setup]   /' >&2
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

# ---------------------------------------------------------------- ensure_oldest_venv

# .venv-oldest: the oldest runtime dependency versions pyproject.toml allows (each pinned
# to its lower bound by scripts/oldest_deps.py) plus pytest and pytest-aiohttp, for the
# tests marked `unit`.  The project itself is not installed:
# PYTHONPATH points at it.
# Reinstalled only when that list changes (stamp .venv-oldest/.installed-<sha256 of it>).
ensure_oldest_venv() {
    local venv="$BUILDER_ROOT/.venv-oldest" requirements sum stamp pip_log
    requirements="$(python3 "$BUILDER_ROOT/scripts/oldest_deps.py" --with pytest --with pytest-aiohttp)" || {
        _setup_log "scripts/oldest_deps.py failed"
        return 1
    }
    sum="$(printf '%s\n' "$requirements" "$(python3 -V 2>&1)" | sha256sum | cut -d' ' -f1)"
    stamp="$venv/.installed-$sum"
    if [ -f "$stamp" ] && "$venv/bin/python" -c '' >/dev/null 2>&1; then
        return 0
    fi
    _setup_log "creating $venv with the oldest allowed versions: $(printf '%s' "$requirements" | grep '==' | tr '\n' ' ')"
    rm -rf "$venv"
    python3 -m venv "$venv" || { _setup_log "python3 -m venv $venv failed"; return 1; }
    pip_log="$venv/pip-install.log"
    printf '%s\n' "$requirements" >"$venv/requirements.txt"
    # One resolution for all: a test tool may not drag a runtime dependency past its pin.
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install -q -r "$venv/requirements.txt" \
        >"$pip_log" 2>&1; then
        _setup_log "pip install into $venv failed; last lines of $pip_log:"
        tail -n 30 "$pip_log" | sed 's/^/[setup]   /' >&2
        return 1
    fi
    touch "$stamp"
}

# run_oldest_unit_tests: the tests marked `unit` in .venv-oldest (ensure_oldest_venv first).
run_oldest_unit_tests() {
    local files
    # Only the files that carry the marker are collected: the others import test tools
    # (schemathesis, bcrypt) that .venv-oldest does not have.
    mapfile -t files < <(cd "$BUILDER_ROOT" && grep -l '^pytestmark = pytest.mark.unit$\|^@pytest.mark.unit$' tests/test_*.py)
    [ "${#files[@]}" -gt 0 ] || { _setup_log "no test is marked unit"; return 1; }
    _setup_log "unit tests on the oldest allowed dependency versions (${#files[@]} files)"
    (cd "$BUILDER_ROOT" && PYTHONPATH="$BUILDER_ROOT" .venv-oldest/bin/python -m pytest -q -m unit -p no:cacheprovider "${files[@]}")
}

# run_static_checks: ruff (lint and format) on builder/, tests/, benchmarks/; mypy (strict,
# configured in pyproject.toml) on builder/.  Uses the tools in .venv.
run_static_checks() {
    local venv="$BUILDER_ROOT/.venv"
    _setup_log "ruff check, ruff format --check, mypy"
    (
        cd "$BUILDER_ROOT" &&
            "$venv/bin/ruff" check builder tests benchmarks &&
            "$venv/bin/ruff" format --check builder tests benchmarks &&
            "$venv/bin/mypy" builder
    )
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
        _buildkit_answers "$_DOCKER_SOCK" && return 0
        _setup_log "its BuildKit does not finish a build (deadlocked); restarting dockerd"
        _stop_dockerd "$_DOCKER_PIDFILE" || { _setup_log "could not stop the dockerd of $_DOCKER_PIDFILE"; return 1; }
    fi

    _apt_install docker.io || return 1
    _start_dockerd || return 1
}

# A client to build the base image with; docker.io ships one.
_ensure_docker_client() {
    _docker_cli >/dev/null && return 0
    _apt_install docker.io
}

# _stop_dockerd PIDFILE: SIGTERM to the dockerd of PIDFILE, and wait for it to exit.
# Returns 2 when PIDFILE names no running dockerd.
_stop_dockerd() {
    local pidfile="$1" pid start=$SECONDS
    pid="$(tr -dc '0-9' 2>/dev/null <"$pidfile" || true)"
    _pid_is_dockerd "$pid" || return 2
    _setup_log "stopping dockerd (pid $pid, $pidfile)"
    _run_as_root kill -TERM "$pid" || return 1
    while _pid_alive "$pid"; do
        if [ $((SECONDS - start)) -ge "$BUILDER_ENGINE_TIMEOUT" ]; then
            _setup_log "dockerd (pid $pid) still running after ${BUILDER_ENGINE_TIMEOUT}s"
            return 1
        fi
        sleep 0.2
    done
}

_start_dockerd() {
    local pid=""
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
    _spawn_dockerd "$BUILDER_DOCKERD_LOG" || return 1
    _wait_for_engine "$_SPAWNED_PID"
}

# _spawn_dockerd LOG [ARG...]: start dockerd in the background, detached from
# this script; its pid goes to _SPAWNED_PID (empty when started through sudo).
_spawn_dockerd() {
    local log="$1" dockerd
    shift
    dockerd="$(command -v dockerd 2>/dev/null || echo /usr/sbin/dockerd)"
    if [ ! -x "$dockerd" ]; then
        _setup_log "dockerd not found after installing docker.io"
        return 1
    fi
    _run_as_root mkdir -p "$(dirname "$log")" || return 1
    # setsid + nohup: dockerd outlives this script and its process group.
    # Without --containerd, dockerd starts and supervises its own containerd.
    # BuildKit clips a step's output at 200 KiB/s by default ("-1" clips at once on
    # this engine): 1 GiB for both limits means a build's log is never clipped.
    export BUILDKIT_STEP_LOG_MAX_SIZE="${BUILDKIT_STEP_LOG_MAX_SIZE:-1073741824}"
    export BUILDKIT_STEP_LOG_MAX_SPEED="${BUILDKIT_STEP_LOG_MAX_SPEED:-1073741824}"
    _SPAWNED_PID=""
    if [ "$(id -u)" -eq 0 ]; then
        setsid nohup "$dockerd" "$@" >>"$log" 2>&1 </dev/null &
        _SPAWNED_PID=$!
        disown "$_SPAWNED_PID" 2>/dev/null || true
    else
        # shellcheck disable=SC2016  # expanded by the inner sh
        sudo -n --preserve-env=BUILDKIT_STEP_LOG_MAX_SIZE,BUILDKIT_STEP_LOG_MAX_SPEED \
            sh -c 'log="$1"; shift; setsid nohup "$@" >>"$log" 2>&1 </dev/null &' sh "$log" "$dockerd" "$@" ||
            { _setup_log "cannot start dockerd without root"; return 1; }
    fi
}

# _wait_for_engine PID [HOST [LOG]]: wait until HOST (default: the local
# socket) answers ping, failing early if PID exits, and after
# $BUILDER_ENGINE_TIMEOUT seconds otherwise.  LOG is shown on failure.
_wait_for_engine() {
    local pid="$1" host="${2:-}" log="${3:-$BUILDER_DOCKERD_LOG}" start=$SECONDS
    local where="${host:-unix://$_DOCKER_SOCK}"
    while ! _engine_ping "$host"; do
        # The default engine may have been started by someone else meanwhile.
        if [ -n "$pid" ] && ! _pid_alive "$pid" && { [ -n "$host" ] || ! _running_dockerd >/dev/null; }; then
            _setup_log "dockerd exited before answering on $where"
            _dockerd_log_tail "$log"
            return 1
        fi
        if [ $((SECONDS - start)) -ge "$BUILDER_ENGINE_TIMEOUT" ]; then
            _setup_log "dockerd did not answer on $where within ${BUILDER_ENGINE_TIMEOUT}s"
            _dockerd_log_tail "$log"
            return 1
        fi
        sleep 0.5
    done
    _setup_log "engine at $where up after $((SECONDS - start))s ($(_docker_at "$host" version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}' 2>/dev/null || echo '?'))"
}

# _docker_at HOST ARG...: the docker client against HOST (empty: the default engine).
_docker_at() {
    local host="$1"
    shift
    if [ -n "$host" ]; then
        DOCKER_HOST="$host" _docker "$@"
    else
        _docker "$@"
    fi
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

# ---------------------------------------------------------------- ensure_second_engine

# A second Docker Engine beside the main one, for the multi-engine tests: its own
# data root, exec root (socket, pid file, its own containerd), config file and
# default bridge.  Started once, reused by later runs.
_ENGINE2_DATA_ROOT=/var/lib/builder-engine2
_ENGINE2_EXEC_ROOT=/var/run/builder-engine2
_ENGINE2_SOCK="$_ENGINE2_EXEC_ROOT/docker.sock"
_ENGINE2_PIDFILE="$_ENGINE2_EXEC_ROOT/docker.pid"
_ENGINE2_HOST="unix://$_ENGINE2_SOCK"
# Not `--bridge=none`: with it dockerd deletes docker0, the main engine's bridge, at
# start-up (moby's removeDefaultBridgeInterface).  It gets a bridge of its own instead,
# made here, on a subnet outside Docker's default pools (172.17-31.x, 192.168.x), so
# builds on it have the same default ("bridge") network as on the main engine.
_ENGINE2_BRIDGE=builder-br2
_ENGINE2_BRIDGE_ADDR=10.213.7.1/24
BUILDER_DOCKERD2_LOG="${BUILDER_DOCKERD2_LOG:-/var/log/builder-dockerd2.log}"

# ensure_second_engine: the second engine answers on $_ENGINE2_SOCK (started if
# not) and holds $BASE_IMAGE (copied from the main engine, so run
# ensure_base_image first); exports BUILDER_SECOND_DOCKER_HOST.  Idempotent.
ensure_second_engine() {
    if _engine_ping "$_ENGINE2_HOST" && ! _buildkit_answers "$_ENGINE2_SOCK"; then
        _setup_log "the second engine's BuildKit does not finish a build (deadlocked); restarting it"
        stop_second_engine || return 1
    fi
    if _engine_ping "$_ENGINE2_HOST"; then
        _setup_log "second engine at $_ENGINE2_HOST answers"
    else
        _apt_install docker.io iproute2 || return 1
        _start_second_engine || return 1
    fi
    export BUILDER_SECOND_DOCKER_HOST="$_ENGINE2_HOST"
    _copy_base_image "$_ENGINE2_HOST"
}

_start_second_engine() {
    local pid
    if [ -f "$_ENGINE2_PIDFILE" ]; then
        pid="$(tr -dc '0-9' <"$_ENGINE2_PIDFILE" 2>/dev/null || true)"
        if _pid_is_dockerd "$pid"; then
            _setup_log "second dockerd (pid $pid) is running but not answering yet; waiting for it"
            _wait_for_engine "$pid" "$_ENGINE2_HOST" "$BUILDER_DOCKERD2_LOG"
            return
        fi
        _run_as_root rm -f "$_ENGINE2_PIDFILE" || return 1
    fi
    _run_as_root rm -f "$_ENGINE2_SOCK" || return 1
    _ensure_engine2_bridge || return 1
    _run_as_root mkdir -p "$_ENGINE2_DATA_ROOT" "$_ENGINE2_EXEC_ROOT" || return 1
    # A config file of its own: /etc/docker/daemon.json is the main engine's and may set
    # hosts or roots that clash with the flags below.  Its own key too (/etc/docker/key.json
    # otherwise), so its engine ID in GET /info differs from the main engine's.
    echo '{"deprecated-key-path": "'"$_ENGINE2_DATA_ROOT"'/key.json"}' | _run_as_root tee "$_ENGINE2_EXEC_ROOT/daemon.json" >/dev/null || return 1
    _setup_log "starting the second dockerd on $_ENGINE2_HOST (log: $BUILDER_DOCKERD2_LOG)"
    # No iptables rules, NAT or ip_forward changes: those are the main engine's business.
    _spawn_dockerd "$BUILDER_DOCKERD2_LOG" \
        --config-file "$_ENGINE2_EXEC_ROOT/daemon.json" \
        --data-root "$_ENGINE2_DATA_ROOT" \
        --exec-root "$_ENGINE2_EXEC_ROOT" \
        --pidfile "$_ENGINE2_PIDFILE" \
        --host "$_ENGINE2_HOST" \
        --bridge "$_ENGINE2_BRIDGE" \
        --iptables=false --ip-masq=false --ip-forward=false || return 1
    _wait_for_engine "$_SPAWNED_PID" "$_ENGINE2_HOST" "$BUILDER_DOCKERD2_LOG"
}

_ensure_engine2_bridge() {
    if ! ip link show "$_ENGINE2_BRIDGE" >/dev/null 2>&1; then
        _setup_log "creating bridge $_ENGINE2_BRIDGE ($_ENGINE2_BRIDGE_ADDR)"
        _run_as_root ip link add name "$_ENGINE2_BRIDGE" type bridge || return 1
    fi
    if ! ip -4 -o addr show dev "$_ENGINE2_BRIDGE" | grep -q " $_ENGINE2_BRIDGE_ADDR "; then
        _run_as_root ip addr add "$_ENGINE2_BRIDGE_ADDR" dev "$_ENGINE2_BRIDGE" || return 1
    fi
    _run_as_root ip link set "$_ENGINE2_BRIDGE" up
}

# stop_second_engine: SIGTERM to the second dockerd, wait for it to exit, remove
# its bridge.  Its data root stays, so the next start finds its images.
stop_second_engine() {
    local rc=0
    _stop_dockerd "$_ENGINE2_PIDFILE" || rc=$?
    case "$rc" in
        0) ;;
        2) _setup_log "second engine not running" ;;
        *) return 1 ;;
    esac
    if ip link show "$_ENGINE2_BRIDGE" >/dev/null 2>&1; then
        _run_as_root ip link delete "$_ENGINE2_BRIDGE" || return 1
    fi
}

# _copy_base_image HOST: $BASE_IMAGE from the main engine into the engine at
# HOST, unless it has it already.
_copy_base_image() {
    local host="$1"
    if _docker_at "$host" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        _setup_log "base image $BASE_IMAGE present on $host"
        return 0
    fi
    _setup_log "copying base image $BASE_IMAGE to $host"
    _docker save "$BASE_IMAGE" | _docker_at "$host" load -q >/dev/null || {
        _setup_log "copying $BASE_IMAGE to $host failed"
        return 1
    }
}

# ---------------------------------------------------------------- test tools

# _apt_install_no_start PKG...: _apt_install, but no service of the packages is
# started on install (a policy-rc.d that forbids it, honoured by invoke-rc.d and
# deb-systemd-invoke): the tests run their own instances on free ports.
_apt_install_no_start() {
    local policy=/usr/sbin/policy-rc.d all_installed=1 ours="" rc=0 p
    for p in "$@"; do
        _pkg_installed "$p" || all_installed=""
    done
    [ -z "$all_installed" ] || return 0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | _run_as_root tee "$policy" >/dev/null &&
            _run_as_root chmod 755 "$policy" && ours=1
    fi
    _apt_install "$@" || rc=$?
    [ -z "$ours" ] || _run_as_root rm -f "$policy"
    return "$rc"
}

# ensure_redis_tool: Debian's redis-server, which the cluster tests run on a free
# loopback port with their own data dir (tests/processes.py starts it).
ensure_redis_tool() {
    _apt_install_no_start redis-server || return 1
    export BUILDER_REDIS_BIN=/usr/bin/redis-server
}

# ensure_nginx_tool: Debian's nginx, which the cluster tests run as a reverse
# proxy from a config of their own (tests/processes.py starts it).
ensure_nginx_tool() {
    _apt_install_no_start nginx || return 1
    export BUILDER_NGINX_BIN=/usr/sbin/nginx
}

# ensure_registry_tool: Debian's docker-registry, which the push tests run on a
# free loopback port with their own storage (tests/conftest.py starts it).
ensure_registry_tool() {
    _apt_install docker-registry || return 1
    # The package may start a system-wide instance on :5000; the tests do not use it.
    export BUILDER_REGISTRY_BIN=/usr/bin/docker-registry
}
