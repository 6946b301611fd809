"""The control plane: what the ranks of a job tell each other over the one shared store.

Everything here is paid N times on a store every rank shares (one libuv thread that torch
also needs for new communicators), and everything read back is untrusted. So: nothing in
steady state, O(1) requests per rank per event, node-local first, wait rather than poll.

============  ==================================================================
module        concept
============  ==================================================================
protocol      key names, one-request reads, defensive parsing of store values
channel       the node-local channel: per-host slots in a private directory
progress      what this rank is doing (Flight Recorder, main-thread stack)
agent         the per-rank thread: hang detection, acting on a verdict
waiter        the per-host thread blocked on the store for the next event
incident      one hang incident: per-host answers, the assembled verdict
verdict       pure functions: the cross-rank hang table (``HangReport``)
hostactions   signalling a local rank and writing its error file, on local evidence
unblock       failing this rank's blocked collectives (NCCL abort, gloo shutdown)
failures      failure records: who failed first, in O(N)
stop          the coordinated stop (``should_stop``)
snapshot      a running job's table from outside (``distruntime where``, the plugin)
============  ==================================================================

See ``docs/reliability.md`` for the design and its measured cost, ``docs/security.md`` for
the trust boundary.
"""
