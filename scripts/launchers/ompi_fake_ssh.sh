#!/bin/sh
# Stand-in for ssh as Open MPI's rsh agent (--mca plm_rsh_agent THIS), used to
# simulate a second node on this host: `mpirun --host 127.0.0.1:2,127.0.0.2:2`
# treats 127.0.0.2 as a remote node and "ssh"es there to start its orted.
# Called as: ompi_fake_ssh.sh [ssh options] HOST COMMAND...
# It drops the options and HOST and runs COMMAND here.
while [ $# -gt 0 ]; do
  case "$1" in
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;   # ssh options that take an argument
    -*) shift ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || { echo "ompi_fake_ssh.sh: usage: [opts] HOST COMMAND..." >&2; exit 255; }
shift   # HOST
exec /bin/sh -c "$*"
