#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try the sbatch scripts (and for the test suite).
#
#   bash run_scripts/slurm/local_cluster.sh install   # slurm-wlm + munge from Debian if missing (root, apt)
#   bash run_scripts/slurm/local_cluster.sh start     # munged, slurmctld, slurmd; prints the SLURM_CONF line
#   export SLURM_CONF=$LOCAL_SLURM_DIR/slurm.conf     # then sbatch / squeue / scontrol / scancel as usual
#   bash run_scripts/slurm/local_cluster.sh status
#   bash run_scripts/slurm/local_cluster.sh stop      # stops the daemons it started (by pid), removes the dir
#
# Everything lives in LOCAL_SLURM_DIR (default /tmp/videomae-local-slurm): munge key and socket, slurm.conf,
# state, spool, logs and pid files; nothing under /etc is touched. One node named after this host with all
# its CPUs, one partition "local", proctrack/linuxproc and task/none (no cgroups needed), no accounting.
# LOCAL_SLURM_NODES=2 adds a second node, "localhost", served by a second slurmd on this machine: multi-node jobs
# (node lists, node ranks, a rendezvous on the first node of the list) then run here too.
# Start it as root (slurmd runs each job as the user who submitted it); any user may then submit.
# Ports: LOCAL_SLURM_PORTS="<slurmctld> <first slurmd>" (default "6917 6918"; a second slurmd takes the next
# port), outside the 10000-29999 range that jobs derive their rendezvous ports from.
set -euo pipefail

dir=${LOCAL_SLURM_DIR:-/tmp/videomae-local-slurm}
read -r ctld_port slurmd_port <<< "${LOCAL_SLURM_PORTS:-6917 6918}"
node=$(hostname -s)
case "${LOCAL_SLURM_NODES:-1}" in
  1) nodes=("$node") ;;
  2) [ "$node" != localhost ] || { echo "local_cluster: two nodes need a host name other than localhost" >&2; exit 1; }
     nodes=("$node" localhost) ;;  # both names resolve to this machine, as a real node's name does
  *) echo "local_cluster: LOCAL_SLURM_NODES must be 1 or 2" >&2; exit 1 ;;
esac

die() { echo "local_cluster: $*" >&2; exit 1; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
  && command -v sbatch >/dev/null; }

install() {
  if have_slurm; then echo "slurm and munge already installed: $(slurmctld -V)"; return; fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are missing and installing them needs root (apt-get)"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  have_slurm || die "apt-get finished but slurmctld/slurmd/munged/sbatch are still missing"
  echo "installed $(slurmctld -V)"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat > "$dir/slurm.conf" <<EOF
# Written by run_scripts/slurm/local_cluster.sh: a one-node localhost cluster.
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
SlurmctldPort=$ctld_port
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to 'scontrol show job' for an hour (there is no accounting database).
MinJobAge=3600
KillWait=30
SchedulerParameters=sched_interval=2
EOF
  local i
  for i in "${!nodes[@]}"; do
    echo "NodeName=${nodes[$i]} NodeHostname=$node NodeAddr=127.0.0.1 Port=$((slurmd_port + i)) CPUs=$cpus" \
      "RealMemory=$mem State=UNKNOWN" >> "$dir/slurm.conf"
  done
  echo "# Jobs share CPUs (up to 4 per CPU), so several small jobs run side by side on a small machine." \
    >> "$dir/slurm.conf"
  echo "PartitionName=local Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP" \
    "OverSubscribe=FORCE:4" >> "$dir/slurm.conf"
}

start() {
  have_slurm || die "slurm-wlm/munge not installed: run '$0 install' first"
  if pid_alive "$dir/slurmctld.pid"; then echo "already running: export SLURM_CONF=$dir/slurm.conf"; return; fi
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
  chmod 755 "$dir/munge"  # clients of any user reach the socket; the key inside stays 0600
  [ -s "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 600 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed" \
    || die "munged did not start: see $dir/munged.log"
  write_conf
  slurmctld -f "$dir/slurm.conf" || die "slurmctld did not start: see $dir/slurmctld.log"
  local name waited=0
  for name in "${nodes[@]}"; do
    mkdir -p "$dir/spool/$name"
    slurmd -f "$dir/slurm.conf" -N "$name" || die "slurmd of $name did not start: see $dir/slurmd-$name.log"
  done
  export SLURM_CONF="$dir/slurm.conf"
  until [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" = "${#nodes[@]}" ]; do
    sleep 1; waited=$((waited + 1))
    [ $waited -lt 60 ] || { status || true; die "nodes not idle after 60 s: see $dir/slurmd-*.log, $dir/slurmctld.log"; }
  done
  echo "local Slurm cluster up (nodes ${nodes[*]}, $(nproc) CPUs each, partition local):" \
    "export SLURM_CONF=$dir/slurm.conf"
}

daemons() {  # pid-file stems, in the order to stop them
  local file
  for file in "$dir"/slurmd-*.pid; do [ -e "$file" ] && basename "$file" .pid; done
  echo slurmctld
  echo munged
}

status() {
  local name
  for name in $(daemons); do
    if pid_alive "$dir/$name.pid"; then echo "$name running (pid $(cat "$dir/$name.pid"))"; else echo "$name stopped"; fi
  done
  if [ -f "$dir/slurm.conf" ]; then SLURM_CONF="$dir/slurm.conf" sinfo -N -l 2>&1 || true; fi
}

stop() {
  local name pid tries
  for name in $(daemons); do
    pid_alive "$dir/$name.pid" || continue
    pid=$(cat "$dir/$name.pid")
    kill "$pid"
    for tries in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    echo "stopped $name (pid $pid)"
  done
  case "$dir" in /|"") die "refusing to remove '$dir'";; esac
  rm -rf "$dir"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  status) status ;;
  stop) stop ;;
  *) die "usage: $0 install|start|status|stop" ;;
esac
