#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine (Debian/Ubuntu, as root); idempotent.
#
#   .ci/slurm-up.sh      install if needed, configure, start what is not running, wait for `idle`
#
# Safe to run again: a cluster that already runs this configuration is left alone; a changed
# configuration is written and applied with `scontrol reconfigure` (jobs survive), or with
# FMGEN_SLURM_RESTART=1 by restarting the daemons from a clean state (needed when nodes
# change). CI calls it before the tests (nothing started by hand survives into a CI run).
#
# The node is this host (partition `debug`, the default; CPUs = nproc, RealMemory a little
# below the machine's). Four virtual GPU nodes `vgpu[1-4]` (8 GPUs each, partition `virtual`)
# are declared in state CLOUD: powered-down nodes that the scheduler counts as available, so
# `sbatch --test-only -p virtual --nodes=4 slurm/train.sbatch` checks the scripts' multi-node,
# multi-GPU directives as a GPU cluster would. (FUTURE or DOWN nodes do not serve: --test-only
# answers "Requested node configuration is not available".) Nothing can run on them (their
# ResumeProgram fails): never submit real jobs to `virtual`.
#
# State, spool, pid and log files live in $FMGEN_SLURM_DIR (default /var/tmp/fmgen-slurm).
set -euo pipefail

STATE_DIR=${FMGEN_SLURM_DIR:-/var/tmp/fmgen-slurm}
WAIT_S=${FMGEN_SLURM_WAIT_S:-90}
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
HOST=$(hostname -s)

say() { echo "slurm-up: $*"; }
die() {
    echo "slurm-up: ERROR: $*" >&2
    for f in "$STATE_DIR"/slurmctld.log "$STATE_DIR"/slurmd.log /var/log/munge/munged.log; do
        [[ -f $f ]] && { echo "--- last lines of $f" >&2; tail -n 25 "$f" >&2; }
    done
    exit 1
}
node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1 || true; }
ready() { [[ $1 =~ ^(idle|mixed|allocated|completing)$ ]]; }

if [[ $(id -u) -ne 0 ]]; then
    command -v sinfo >/dev/null && ready "$(node_state)" && { say "cluster up (not root: nothing changed)"; exit 0; }
    die "must run as root (installs packages, writes /etc/slurm, starts daemons)"
fi

# --- 1. packages -----------------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -q >/dev/null || true
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
            die "apt-get install ${missing[*]} failed"
    fi
fi

# --- 2. munge --------------------------------------------------------------------------------
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey -c -f -k /etc/munge/munge.key 2>/dev/null ||
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key && chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- munged --force
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null 2>&1 || die "munged does not answer (munge -n | unmunge)"
fi

# --- 3. slurm.conf ---------------------------------------------------------------------------
CPUS=$(nproc)
MEM_MIB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
REAL_MIB=$((MEM_MIB * 9 / 10)) # below the machine's, or slurmd drains the node ("Low RealMemory")
mkdir -p /etc/slurm "$STATE_DIR"/{ctld,d}
new_conf=$(
    cat <<CONF
# Written by fmgen .ci/slurm-up.sh: a one-node test cluster plus virtual nodes for --test-only.
ClusterName=fmgen
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued batch job may not start again before its old credential expires (default 120 s),
# and then waits for the next periodic scheduling pass (default every 60 s). 10 s is plenty for a
# step launch on this one machine and keeps the requeue test from idling (slurm.conf: "It must be
# sufficiently long enough to load user environment, run prolog").
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# A container's nproc may differ from the hardware slurmd detects: trust this file.
SlurmdParameters=config_overrides
ReturnToService=2
# Batch jobs may be requeued (scontrol requeue); the scripts also ask for --requeue.
JobRequeue=1
# Time between SIGTERM and SIGKILL (time limit, scancel): room to write a checkpoint.
KillWait=60
# No slurmdbd here: finished jobs stay visible to 'scontrol show job' for an hour.
MinJobAge=3600
InactiveLimit=0
GresTypes=gpu
NodeName=$HOST CPUs=$CPUS RealMemory=$REAL_MIB State=UNKNOWN
NodeName=vgpu[1-4] CPUs=64 RealMemory=512000 Gres=gpu:8 State=CLOUD
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=virtual Nodes=vgpu[1-4] MaxTime=INFINITE State=UP
# Power saving exists only to make vgpu[1-4] CLOUD nodes; it never touches $HOST.
ResumeProgram=/bin/false
SuspendProgram=/bin/true
SuspendTime=600
ResumeTimeout=60
SuspendExcNodes=$HOST
SuspendExcParts=debug
CONF
)
new_gres="NodeName=vgpu[1-4] Name=gpu Count=8"

changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    [[ -f $CONF ]] && cp "$CONF" "$CONF.bak"
    printf '%s\n' "$new_conf" >"$CONF"
    say "wrote $CONF"
    changed=1
fi
if [[ ! -f $GRES_CONF ]] || [[ "$(cat "$GRES_CONF")" != "$new_gres" ]]; then
    printf '%s\n' "$new_gres" >"$GRES_CONF"
    changed=1
fi

# --- 4. daemons ------------------------------------------------------------------------------
running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ((changed)) && running "$STATE_DIR/slurmctld.pid" && [[ ${FMGEN_SLURM_RESTART:-0} != 1 ]]; then
    # Keep the jobs of whoever uses the cluster: most settings take effect on reconfigure.
    say "configuration changed: scontrol reconfigure (FMGEN_SLURM_RESTART=1 restarts clean)"
    scontrol reconfigure || die "scontrol reconfigure failed; try FMGEN_SLURM_RESTART=1"
    changed=0
fi
if ((changed)); then
    for d in slurmd slurmctld; do
        pidf=$STATE_DIR/$d.pid
        if running "$pidf"; then
            pid=$(cat "$pidf")
            say "stopping $d ($pid) for the new configuration"
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
    done
fi
if ! running "$STATE_DIR/slurmctld.pid"; then
    say "starting slurmctld"
    # A new configuration starts clean (-c: no jobs or node states saved under an older one).
    if ((changed)); then slurmctld -c; else slurmctld; fi || die "slurmctld did not start"
fi
for _ in $(seq 40); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.5; done
scontrol ping 2>/dev/null | grep -q "is UP" || die "slurmctld does not answer (scontrol ping)"
running "$STATE_DIR/slurmctld.pid" || die "slurmctld exited (another controller on its port?)"
if ! running "$STATE_DIR/slurmd.pid"; then
    say "starting slurmd"
    slurmd || die "slurmd did not start"
fi

# --- 5. wait for the node --------------------------------------------------------------------
deadline=$((SECONDS + WAIT_S))
state=$(node_state)
until ready "$state"; do
    # e.g. left down by an earlier run: ReturnToService=2 does not cover every case
    [[ $state =~ ^(down|drain|fail) ]] && scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1
    ((SECONDS < deadline)) || die "node $HOST not ready after ${WAIT_S}s (state: '${state:-no answer}')"
    sleep 1
    state=$(node_state)
done
say "cluster up: node $HOST ($CPUS CPUs, $REAL_MIB MiB) is $state; $(sinfo --version)"
sinfo
