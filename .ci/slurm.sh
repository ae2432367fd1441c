#!/usr/bin/env bash
# A two-node Slurm cluster on 127.0.0.1 for the multi-node pre-training test: Debian's
# slurmctld and two slurmd (nodes "node1" and "node2", one CPU each), installed if
# missing, configured in a temporary folder; prints the slurm.conf path (SLURM_CONF).
# Jobs run as the user who starts it (root in CI); no munge (auth/none), loopback only.
set -euo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  as_root apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq slurmctld slurmd slurm-client >&2
fi
dir=$(mktemp -d /tmp/mae-ops-slurm.XXXXXX)
mkdir -p "$dir/state" "$dir/log"
read -r ctld port1 port2 < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
user=$(id -un)
cat > "$dir/slurm.conf" <<CONF
ClusterName=maeops
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port1 CPUs=1 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port2 CPUs=1 State=UNKNOWN
PartitionName=local Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -c >&2
for node in node1 node2; do slurmd -N "$node" >&2; done
for _ in $(seq 60); do
  if [ "$(sinfo -h -o '%T' | sort -u)" = idle ]; then echo "$SLURM_CONF"; exit 0; fi
  sleep 1
done
echo "slurm.sh: the nodes did not come up:" >&2
sinfo >&2 || true
tail -n 20 "$dir"/log/*.log >&2 || true
exit 1
