#!/bin/sh
# Stand-in for ssh as an MPI launcher's remote agent (Open MPI: --mca plm_rsh_agent THIS;
# Hydra: -launcher ssh -launcher-exec THIS), to reach simulated nodes on this host:
# * HOST node1 / node2 (the network-namespace hosts of netns.sh): runs COMMAND inside
#   that node's namespace (its own network, hostname and /etc/hosts), bounded like any
#   `netns.sh exec`;
# * any other HOST (e.g. 127.0.0.2 for `mpirun --host 127.0.0.1:2,127.0.0.2:2`): runs
#   COMMAND here.
# Called as: ompi_fake_ssh.sh [ssh options] HOST COMMAND...
while [ $# -gt 0 ]; do
  case "$1" in
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;   # ssh options that take an argument
    -*) shift ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || { echo "ompi_fake_ssh.sh: usage: [opts] HOST COMMAND..." >&2; exit 255; }
host=$1
shift
case "$host" in
  node1|node2) exec bash "$(dirname "$0")/netns.sh" exec "$host" /bin/sh -c "$*" ;;
  *) exec /bin/sh -c "$*" ;;
esac
