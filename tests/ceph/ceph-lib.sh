# Sourced by start-ceph.sh and stop-ceph.sh; they set DIR and CONF first.

# daemon_pid NAME (mon.a, osd.0, mgr.x): the pid of this cluster's running
# daemon, or nothing. Only a process whose command line names this
# cluster's ceph.conf counts, so a recycled pid is never signalled.
daemon_pid() {
  local f=$DIR/run/$1.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f" 2>/dev/null || true)
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$CONF" && echo "$pid"
  return 0
}
