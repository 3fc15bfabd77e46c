#!/usr/bin/env bash
# Rolling deploy of the backends behind an nginx upstream, one backend at a time, without
# cutting a request:
#
#   1. mark the backend `down` in the upstream and reload nginx (new requests go elsewhere);
#   2. block until drain-agent says no connection to the backend is open any more
#      (requests still in flight through nginx's old workers, and their idle keep-alive
#      connections, included);
#   3. stop the backend (SIGTERM);
#   4. start the new version and wait for its health check;
#   5. put it back in the upstream and reload nginx.
#
# To adapt it: set the variables below (environment), and replace stop_backend/start_backend,
# which here manage plain processes through pid files, with your service manager
# (e.g. `systemctl stop myapp@$port` / `systemctl start myapp@$port`).
#
# DRAIN=sleep and DRAIN=none replace step 2 by a fixed sleep or by nothing: the baselines the
# end-to-end test (drain-agent/tests/rolling_deploy.rs) compares against.
#
# Needs: bash, nginx, curl, ps, sed, and drain-agent running on the host (as root).
set -euo pipefail

# ---- Settings -----------------------------------------------------------------------------

# The backends, in deploy order, as HOST:PORT exactly as in the upstream's `server` lines.
BACKENDS=${BACKENDS:-}
# The file holding the `upstream` block: one `server HOST:PORT [options];` line per backend.
UPSTREAM_CONF=${UPSTREAM_CONF:-/etc/nginx/nginx.conf}
# How to call nginx so that it finds your configuration (add -p/-c/-e if it is not the
# default one; words are split on spaces), and its master's pid file.
NGINX_CMD=${NGINX_CMD:-nginx}
NGINX_PID_FILE=${NGINX_PID_FILE:-/run/nginx.pid}

# How to wait between "out of nginx" and "stop": agent | sleep | none.
DRAIN=${DRAIN:-agent}
DRAIN_AGENT=${DRAIN_AGENT:-drain-agent}
DRAIN_AGENT_URL=${DRAIN_AGENT_URL:-http://127.0.0.1:9100}
# Give up (and leave the backend out of nginx, running) if it is not drained by then.
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-60s}
# Drained only once no connection has been open for this long: covers a connection that an
# old nginx worker is still opening (a retry from another backend) at the moment we look.
DRAIN_QUIET=${DRAIN_QUIET:-${DRAIN_SETTLE:-200ms}}
# DRAIN=sleep: how long (seconds).
DRAIN_SLEEP=${DRAIN_SLEEP:-5}

# How to stop a backend, and how long to wait for it to exit before giving up.
STOP_SIGNAL=${STOP_SIGNAL:-TERM}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
# Where the backends' pid files (backend-PORT.pid) and logs (backend-PORT.log) are.
BACKEND_RUN_DIR=${BACKEND_RUN_DIR:-/run/backend}
# The command that starts the new version; the script appends `--listen HOST:PORT`.
BACKEND_START_CMD=${BACKEND_START_CMD:-}
HEALTH_PATH=${HEALTH_PATH:-/health}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-30}

read -r -a nginx <<<"$NGINX_CMD"

# ---- Helpers ------------------------------------------------------------------------------

# Every step is logged as `rolling-deploy: TIME STEP BACKEND details` (the test reads them).
log() { printf 'rolling-deploy: %s %s\n' "$(date +%T.%3N)" "$*"; }
die() { printf 'rolling-deploy: error: %s\n' "$*" >&2; exit 1; }
now_ms() { date +%s%3N; }

# Is process $1 still running? (A zombie has exited: its parent just has not reaped it.)
process_running() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $state != Z* ]]
}

# The pids of nginx's current workers: not the old ones, which are titled
# "nginx: worker process is shutting down" after a reload.
current_nginx_workers() {
    ps -o pid=,args= --ppid "$(cat "$NGINX_PID_FILE")" | awk '/worker process$/ { print $1 }'
}

# ---- Steps --------------------------------------------------------------------------------

# Adds (`down`) or removes (`up`) the `down` flag on the backend's server line.
set_backend_state() {
    local backend=$1 state=$2
    local line="^[[:space:]]*server[[:space:]]+${backend//./\\.}[[:space:];]"
    grep -Eq "$line" "$UPSTREAM_CONF" || die "no 'server $backend' line in $UPSTREAM_CONF"
    # Remove the flag if it is there, then add it back if wanted.
    sed -i --follow-symlinks -E "/$line/ s/[[:space:]]+down([[:space:]]*;)/\\1/" "$UPSTREAM_CONF"
    if [[ $state == down ]]; then
        sed -i --follow-symlinks -E "/$line/ s/;/ down;/" "$UPSTREAM_CONF"
    fi
}

# Checks the configuration, reloads nginx, and waits until the reload has taken effect.
# `nginx -s reload` only sends a signal: until the master has started new workers and told the
# old ones to finish, an old worker still sends *new* requests to a backend marked down, and a
# drain that looked at that moment could see zero connections and stop the backend too early.
reload_nginx() {
    "${nginx[@]}" -t -q || die "nginx rejects the new configuration; not reloading"
    local old_workers current deadline=$((SECONDS + 30))
    old_workers=$(current_nginx_workers)
    "${nginx[@]}" -s reload
    while :; do
        current=$(current_nginx_workers)
        # Done when there are workers and none of them is an old one.
        if [[ -n $current ]] && ! grep -qxF -f <(printf '%s\n' "$old_workers") <<<"$current"; then
            return 0
        fi
        ((SECONDS < deadline)) || die "nginx did not start new workers within 30 s of the reload"
        sleep 0.05
    done
}

# Blocks until nothing is connected to the backend (DRAIN=agent), or stands in for that.
drain_backend() {
    local backend=$1 host=${1%:*} port=${1##*:}
    case $DRAIN in
    agent)
        # drain-agent counts the backend's inbound TCP connections in the kernel; this returns
        # once none has arrived for DRAIN_QUIET. Exit 1: still busy at DRAIN_TIMEOUT.
        if ! "$DRAIN_AGENT" wait --agent "$DRAIN_AGENT_URL" --port "$port" --addr "$host" \
            --timeout "$DRAIN_TIMEOUT" --quiet "$DRAIN_QUIET"; then
            die "$backend not drained within $DRAIN_TIMEOUT: it stays out of nginx and running; deploy stopped"
        fi
        ;;
    sleep) sleep "$DRAIN_SLEEP" ;;
    none) ;;
    *) die "DRAIN must be agent, sleep or none (not $DRAIN)" ;;
    esac
}

# Stops the backend's process and waits until it has exited.
stop_backend() {
    local port=${1##*:} pid deadline=$((SECONDS + STOP_TIMEOUT))
    pid=$(cat "$BACKEND_RUN_DIR/backend-$port.pid")
    kill -s "$STOP_SIGNAL" "$pid" 2>/dev/null || true
    while process_running "$pid"; do
        ((SECONDS < deadline)) || die "backend $1 (pid $pid) still running ${STOP_TIMEOUT}s after SIG$STOP_SIGNAL"
        sleep 0.02
    done
}

# Starts the new version in the background, with its pid file and log.
start_backend() {
    local port=${1##*:}
    local -a command
    read -r -a command <<<"$BACKEND_START_CMD"
    "${command[@]}" --listen "$1" >>"$BACKEND_RUN_DIR/backend-$port.log" 2>&1 &
    echo $! >"$BACKEND_RUN_DIR/backend-$port.pid"
}

# Waits until the backend answers its health check directly (not through nginx).
wait_healthy() {
    local deadline=$((SECONDS + HEALTH_TIMEOUT))
    until curl -fsS --max-time 1 -o /dev/null "http://$1$HEALTH_PATH" 2>/dev/null; do
        ((SECONDS < deadline)) || die "backend $1 not healthy after ${HEALTH_TIMEOUT}s"
        sleep 0.05
    done
}

# ---- The deploy ---------------------------------------------------------------------------

# Sourced (`source rolling-deploy.sh`)? Then only the functions above are wanted, e.g. to run
# one step by hand: `set_backend_state 127.0.0.1:8081 down && reload_nginx`.
if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    return 0
fi

[[ -n $BACKENDS ]] || die 'set BACKENDS, e.g. BACKENDS="127.0.0.1:8081 127.0.0.1:8082"'
[[ -n $BACKEND_START_CMD ]] || die 'set BACKEND_START_CMD, e.g. BACKEND_START_CMD="/opt/app/v2/server"'
read -r -a backends <<<"$BACKENDS"

deploy_started=$(now_ms)
for backend in "${backends[@]}"; do
    log mark-down "$backend"
    set_backend_state "$backend" down
    reload_nginx

    step_started=$(now_ms)
    log drain "$backend" "mode=$DRAIN"
    drain_backend "$backend"
    log drained "$backend" "waited_ms=$(($(now_ms) - step_started))"

    log stop "$backend" "signal=$STOP_SIGNAL"
    stop_backend "$backend"

    log start "$backend"
    start_backend "$backend"
    wait_healthy "$backend"
    log healthy "$backend"

    set_backend_state "$backend" up
    reload_nginx
    log mark-up "$backend"
done
log finished all "deploy_ms=$(($(now_ms) - deploy_started))"
