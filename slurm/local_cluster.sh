#!/bin/bash
# A Slurm on this machine, from Debian's packages, for trying the real sbatch scripts and for the
# tests. Needs root (make setup installs slurmctld, slurmd, slurm-client, munge).
#
#   slurm/local_cluster.sh start               # munged + slurmctld + slurmd, one node, partition "debug"
#   slurm/local_cluster.sh start --nodes 2     # two nodes node1, node2: one network namespace each
#   slurm/local_cluster.sh status
#   slurm/local_cluster.sh stop                # stops the daemons and removes what start wrote
#
# With --nodes N each node is a network namespace (cvtk-node1..N) with its own address
# (10.77.0.11, .12, ...) on a bridge cvtk-br0 (10.77.0.1, where slurmctld listens) and its own
# hostname, running its own slurmd with one CPU; jobs see real separate hosts and talk over TCP.
# Inside every node the interface is called cvtk0 (for GLOO_SOCKET_IFNAME). `start` again
# restarts a node whose slurmd was killed and brings its link back up; `start` with another node
# count stops the running cluster first.
#
# Everything it writes is marked or lives under /var/spool/cvtkit-slurm; an existing
# /etc/slurm/slurm.conf that it did not write is never touched.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by cvtkit slurm/local_cluster.sh"
STATE=/var/spool/cvtkit-slurm
HOST=$(hostname -s)
# The multi-node network: only this bridge's subnet, nothing is routed anywhere else.
NET=10.77.0
BRIDGE=cvtk-br0
IFACE=cvtk0
HOSTS_MARK="# cvtkit local_cluster node"

die() { echo "local_cluster: $*" >&2; exit 1; }

# The node count of the cluster this script wrote (empty if none): a 1-node cluster started
# before --nodes existed has no $STATE/nodes.
current_nodes() {
    [ -f "$CONF" ] && grep -qF "$MARK" "$CONF" || return 0
    cat "$STATE/nodes" 2>/dev/null || echo 1
}

write_conf() {
    local nodes=$1
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching it"
    fi
    local cpus mem ctld spool pidfile logfile node_lines partition i extra=""
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/log"
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    if [ "$nodes" = 1 ]; then
        cpus=$(nproc)
        ctld=$HOST spool=$STATE/d pidfile=$STATE/slurmd.pid logfile=$STATE/log/slurmd.log
        node_lines="NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        partition=$HOST
        mkdir -p "$spool"
    else
        # One CPU and a share of the memory per node; %n is the node's name.
        ctld="$HOST($NET.1)" spool=$STATE/d.%n pidfile=$STATE/slurmd.%n.pid logfile=$STATE/log/slurmd.%n.log
        node_lines=$(for i in $(seq 1 "$nodes"); do
            echo "NodeName=node$i NodeAddr=$NET.$((10 + i)) CPUs=1 RealMemory=$((mem / nodes)) State=UNKNOWN"
        done)
        partition="node[1-$nodes]"
        for i in $(seq 1 "$nodes"); do mkdir -p "$STATE/d.node$i"; done
        # A lost node is declared down after SlurmdTimeout (about 30 s in all, measured, with
        # the pings and the kill of its job).
        extra="SlurmdTimeout=10"
    fi
    cat > "$CONF" <<EOF
$MARK
ClusterName=cvtkit-local
SlurmctldHost=$ctld
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$pidfile
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$logfile
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
# Requeued jobs wait only briefly before they may start again: after cred_expire + 1 s instead
# of the default 121 s; a killed job's processes get 5 s between SIGTERM and SIGKILL.
MinJobAge=30
AuthInfo=cred_expire=10
KillWait=5
${extra:+$extra
}$node_lines
PartitionName=debug Nodes=$partition Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$nodes" > "$STATE/nodes"
}

# Bridge, one namespace per node with a veth into the bridge, and /etc/hosts names. Each step
# is skipped when already there, and links are (re)set up, so that `start` also repairs a node.
network_up() {
    local nodes=$1 i ns
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr replace "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in $(seq 1 "$nodes"); do
        ns=cvtk-node$i
        [ -e "/run/netns/$ns" ] || ip netns add "$ns"
        if ! ip -n "$ns" link show "$IFACE" >/dev/null 2>&1; then
            # a veth left from a namespace that outlived its name (see network_down) goes first
            ip link del "cvtk-h$i" 2>/dev/null || true
            ip link add "cvtk-h$i" type veth peer name "$IFACE" netns "$ns"
            ip -n "$ns" addr add "$NET.$((10 + i))/24" dev "$IFACE"
        fi
        ip link set "cvtk-h$i" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "$IFACE" up
        if ! grep -qF "node$i $HOSTS_MARK" /etc/hosts; then
            grep -qE "^[^#]*[[:space:]]node$i([[:space:]]|$)" /etc/hosts &&
                die "/etc/hosts already names a host node$i; not adding mine"
            echo "$NET.$((10 + i)) node$i $HOSTS_MARK" >> /etc/hosts
        fi
    done
}

# Kills every process in the nodes' namespaces (slurmd, slurmstepd, job tasks: all started by
# this script's slurmds), then removes namespaces, veths, bridge and /etc/hosts lines. A deleted
# namespace lives on while it holds sockets (a killed task's TCP connections over a cut link
# retry for minutes), and its veth with it: the host ends are deleted explicitly, which removes
# both ends at once. /etc/hosts is rewritten in place: it may be a bind mount.
network_down() {
    local ns sig pids hosts veth
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^cvtk-node[0-9]+$/ {print $1}'); do
        for sig in TERM KILL; do
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            [ -n "$pids" ] || break
            # shellcheck disable=SC2086 # a list of pids
            kill -s "$sig" $pids 2>/dev/null || true
            for _ in $(seq 1 20); do
                [ -n "$(ip netns pids "$ns" 2>/dev/null || true)" ] || break
                sleep 0.25
            done
        done
        ip netns del "$ns" || echo "local_cluster: could not delete namespace $ns" >&2
    done
    for veth in $(ip -o link show type veth 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print $2}'); do
        # (one may vanish meanwhile, with its namespace)
        [[ "$veth" =~ ^cvtk-h[0-9]+$ ]] && { ip link del "$veth" 2>/dev/null || true; }
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE" || echo "local_cluster: could not delete $BRIDGE" >&2
    fi
    if grep -qF "$HOSTS_MARK" /etc/hosts; then
        hosts=$(grep -vF "$HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$hosts" > /etc/hosts
    fi
}

# slurmd of node $1 in its namespace, with its own hostname (`ip netns exec` would remount /sys
# without the cgroup filesystem, and slurmd refuses to start then).
start_node() {
    local node=$1 pid
    pid=$(cat "$STATE/slurmd.$node.pid" 2>/dev/null || true)
    # running, and that pid is still this node's slurmd (not a reused pid)
    [ -n "$pid" ] && [ "$(ip netns identify "$pid" 2>/dev/null)" = "cvtk-$node" ] && return 0
    nsenter --net="/run/netns/cvtk-$node" unshare --uts \
        sh -c "hostname $node && exec slurmd -N $node -f $CONF" ||
        die "slurmd of $node did not start; see $STATE/log/slurmd.$node.log"
}

start() {
    local nodes=$1 running i tool
    [ "$(id -u)" = 0 ] || die "start needs root"
    command -v slurmctld >/dev/null || die "slurmctld not installed (run make setup)"
    if [ "$nodes" != 1 ]; then
        for tool in ip nsenter unshare; do
            command -v "$tool" >/dev/null || die "$tool not found (iproute2, util-linux): needed for --nodes $nodes"
        done
    fi
    running=$(current_nodes)
    if [ -n "$running" ] && [ "$running" != "$nodes" ]; then
        echo "local_cluster: switching from $running to $nodes node(s)"
        stop
    fi
    write_conf "$nodes"
    # a working munged, not just one by that name (a stopped one may linger as a zombie)
    if ! munge -n >/dev/null 2>&1; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- munged --force
        touch "$STATE/started-munged"  # so that stop ends it too
    fi
    [ "$nodes" = 1 ] || network_up "$nodes"
    pgrep -f "slurmctld -f $CONF" >/dev/null || slurmctld -f "$CONF"
    if [ "$nodes" = 1 ]; then
        pgrep -f "slurmd -f $CONF" >/dev/null || slurmd -f "$CONF"
    else
        for i in $(seq 1 "$nodes"); do start_node "node$i"; done
    fi
    for _ in $(seq 1 60); do
        # every node up and responding ("idle*" is one that does not respond)
        if [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)$')" -ge "$nodes" ]; then
            if [ "$nodes" = 1 ]; then
                echo "local_cluster: up (node $HOST, partition debug)"
            else
                echo "local_cluster: up ($nodes nodes node[1-$nodes] on $BRIDGE $NET.0/24, partition debug)"
            fi
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
    network_down  # the nodes' slurmds and jobs; after slurmctld, which resolves their names
    if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
        rm -f "$CONF"
    fi
    if [ -f "$STATE/started-munged" ]; then
        pkill -x munged 2>/dev/null || true
        # gone before returning: a switch of node count starts it again right away
        for _ in $(seq 1 40); do
            ps -C munged -o stat= | grep -v '^Z' >/dev/null || break
            sleep 0.25
        done
    fi
    rm -rf "$STATE"
    echo "local_cluster: stopped"
}

status() {
    local nodes
    nodes=$(current_nodes)
    if sinfo -h >/dev/null 2>&1; then
        [ -z "$nodes" ] || echo "local_cluster: $nodes node(s)"
        sinfo
        squeue
    else
        echo "local_cluster: not running"
        return 1
    fi
}

usage() { echo "usage: $0 start [--nodes N] | stop | status" >&2; exit 2; }

case "${1:-}" in
    start)
        nodes=1
        case "${2:-}" in
            "") ;;
            --nodes) nodes=${3:-}; [ $# -eq 3 ] || usage ;;
            --nodes=*) nodes=${2#--nodes=}; [ $# -eq 2 ] || usage ;;
            *) usage ;;
        esac
        [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || die "--nodes: expected a node count 1-99, got '$nodes'"
        start "$nodes" ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
