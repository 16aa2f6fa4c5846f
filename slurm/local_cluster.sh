#!/bin/bash
# A single-node Slurm on this machine, from Debian's packages, for trying the real sbatch scripts
# and for the tests. Needs root (make setup installs slurmctld, slurmd, slurm-client, munge).
#
#   slurm/local_cluster.sh start     # munged + slurmctld + slurmd, partition "debug"
#   slurm/local_cluster.sh status
#   slurm/local_cluster.sh stop      # stops the daemons and removes what start wrote
#
# Everything it writes is marked or lives under /var/spool/cvtkit-slurm; an existing
# /etc/slurm/slurm.conf that it did not write is never touched.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by cvtkit slurm/local_cluster.sh"
STATE=/var/spool/cvtkit-slurm
HOST=$(hostname -s)

die() { echo "local_cluster: $*" >&2; exit 1; }

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching it"
    fi
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
    cat > "$CONF" <<EOF
$MARK
ClusterName=cvtkit-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups in containers: track processes by parent id, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
# Requeued jobs wait only briefly before they may start again.
MinJobAge=30
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [ "$(id -u)" = 0 ] || die "start needs root"
    command -v slurmctld >/dev/null || die "slurmctld not installed (run make setup)"
    write_conf
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- munged --force
        touch "$STATE/started-munged"  # so that stop ends it too
    fi
    pgrep -f "slurmctld -f $CONF" >/dev/null || slurmctld -f "$CONF"
    pgrep -f "slurmd -f $CONF" >/dev/null || slurmd -f "$CONF"
    for _ in $(seq 1 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
            echo "local_cluster: up (node $HOST, partition debug)"
            return 0
        fi
        sleep 0.5
    done
    die "slurm did not come up; see $STATE/log/"
}

stop() {
    pkill -f "slurmd -f $CONF" 2>/dev/null || true
    pkill -f "slurmctld -f $CONF" 2>/dev/null || true
    for _ in $(seq 1 20); do
        pgrep -f "slurm(ctld|d) -f $CONF" >/dev/null || break
        sleep 0.25
    done
    if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
        rm -f "$CONF"
    fi
    if [ -f "$STATE/started-munged" ]; then
        pkill -x munged 2>/dev/null || true
    fi
    rm -rf "$STATE"
    echo "local_cluster: stopped"
}

status() {
    if sinfo -h >/dev/null 2>&1; then
        sinfo
        squeue
    else
        echo "local_cluster: not running"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
