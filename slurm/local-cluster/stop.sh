#!/usr/bin/env bash
# stop.sh - stop the cluster that start.sh started: cancel its jobs, then stop the daemons
# recorded in $MEMTRAIN_SLURM_DIR/run/*.pid, then any slurmstepd that serves this cluster's
# config. Nothing else is touched. Safe to run twice or when nothing runs.
#
#   sudo slurm/local-cluster/stop.sh [--quiet] [--purge]     (--purge also deletes the directory)
set -uo pipefail
DIR=${MEMTRAIN_SLURM_DIR:-/tmp/memtrain-slurm}
CONF=$DIR/etc/slurm.conf
QUIET=0; PURGE=0
for arg in "$@"; do case $arg in --quiet) QUIET=1;; --purge) PURGE=1;; *) echo "usage: $0 [--quiet] [--purge]" >&2; exit 2;; esac; done
say() { [ $QUIET = 1 ] || echo "[local-cluster] $*"; }

alive() {  # PID COMM-REGEX: running (not a zombie) and really that program
    [ -n "$1" ] && [ -d "/proc/$1" ] && grep -qE "$2" "/proc/$1/comm" 2>/dev/null &&
        ! awk '{exit !($3 == "Z")}' "/proc/$1/stat" 2>/dev/null
}
stop_pidfile() {  # PIDFILE COMM-REGEX: TERM, wait up to 10 s, then KILL
    local pid
    [ -f "$1" ] || return 0
    pid=$(cat "$1" 2>/dev/null)
    if alive "$pid" "$2"; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do alive "$pid" "$2" || break; sleep 0.2; done
        alive "$pid" "$2" && kill -KILL "$pid" 2>/dev/null
        say "stopped $(basename "$1" .pid) (pid $pid)"
    fi
    rm -f "$1"
}
our_stepds() {  # slurmstepd processes started by this cluster's slurmd (they carry its SLURM_CONF)
    local pid
    for pid in $(pgrep -x slurmstepd 2>/dev/null); do
        { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null | grep -qx "SLURM_CONF=$CONF" && echo "$pid"
    done
}

if [ -d "$DIR/run" ]; then
    # 1. cancel the jobs first, so no job process outlives the daemons
    if [ -f "$CONF" ] && alive "$(cat "$DIR/run/slurmctld.pid" 2>/dev/null)" '^slurmctld$'; then
        jobs=$(SLURM_CONF=$CONF timeout 15 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// }" ]; then
            say "cancelling jobs $jobs"
            SLURM_CONF=$CONF timeout 15 scancel $jobs 2>/dev/null
            for _ in $(seq 100); do
                [ -z "$(SLURM_CONF=$CONF timeout 5 squeue -h -t R,CG 2>/dev/null)" ] && break; sleep 0.2
            done
        fi
    fi
    # 2. the daemons, slurmd first
    for pidfile in "$DIR"/run/slurmd-*.pid; do [ -e "$pidfile" ] && stop_pidfile "$pidfile" '^slurmd$'; done
    stop_pidfile "$DIR/run/slurmctld.pid" '^slurmctld$'
    stop_pidfile "$DIR/run/munged.pid" '^munged$'
    # 3. step daemons still cleaning up get 5 s, then KILL (their pgid-tracked tasks die with them)
    for _ in $(seq 25); do [ -z "$(our_stepds)" ] && break; sleep 0.2; done
    for pid in $(our_stepds); do say "killing leftover slurmstepd $pid"; kill -KILL "$pid" 2>/dev/null; done
else
    say "nothing runs from $DIR"
fi
# 4. the /etc/hosts line start.sh added (rewrite in place: /etc/hosts may be a bind mount)
if grep -q '# memtrain-slurm$' /etc/hosts 2>/dev/null; then
    kept=$(grep -v '# memtrain-slurm$' /etc/hosts); printf '%s\n' "$kept" > /etc/hosts
fi
[ $PURGE = 1 ] && rm -rf "$DIR"
exit 0
