#!/bin/sh
# Stand-in for ssh as Open MPI's rsh agent (--mca plm_rsh_agent THIS) between the
# network-namespace hosts of netns.sh: `mpirun --host node1:2,node2:2` started on
# node1 "ssh"es to node2 to start its orted; this runs that command inside node2's
# namespace (its own network, hostname and /etc/hosts), bounded like any netns.sh exec.
# Called as: netns_ssh.sh [ssh options] HOST COMMAND...
while [ $# -gt 0 ]; do
  case "$1" in
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;   # ssh options that take an argument
    -*) shift ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || { echo "netns_ssh.sh: usage: [opts] HOST COMMAND..." >&2; exit 255; }
host=$1; shift
exec bash "$(dirname "$0")/netns.sh" exec "$host" /bin/sh -c "$*"
