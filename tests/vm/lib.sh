# Guest-side helpers (busybox sh). Sourced by the runner (/init -> run_suite) and by each scenario
# process. A suite file (tests/vm/suites/NAME.sh) defines:
#   SCENARIOS="a b c"        the scenarios in run order
#   a() { ...; }             one function per scenario; return 0 = pass, `fail MSG` = fail
#   timeout_a=300            optional per-scenario timeout in seconds (default $DEFAULT_TIMEOUT)
# Each scenario runs in its own process group (setsid) with its own scratch dir $T, so a hang is
# killed without taking the whole run down, and leftovers are cleaned up before the next one.

# Real tools by full path: Debian's busybox sh runs its own applet for a bare `losetup`, `mount`,
# ... even when another binary comes first in PATH, and the applets lack options we use.
UBLKD=/usr/local/bin/ublkd
UBLKCTL=/usr/local/bin/ublkctl
MKFS_EXT4=/usr/sbin/mkfs.ext4
E2FSCK=/usr/sbin/e2fsck
LOSETUP=/usr/sbin/losetup
BLOCKDEV=/usr/sbin/blockdev
DMSETUP=/usr/sbin/dmsetup
MOUNT=/usr/bin/mount
UMOUNT=/usr/bin/umount
FIO=/usr/bin/fio
MDADM=/usr/sbin/mdadm
QEMU_NBD=/usr/bin/qemu-nbd
QEMU_IMG=/usr/bin/qemu-img
NBD_CLIENT=/usr/sbin/nbd-client
SOCK=/run/ublkd/ublkd.sock
DEFAULT_TIMEOUT=180
# No udev in the guest: tell libdevmapper not to wait for it (it would hang on a udev cookie).
export DM_DISABLE_UDEV=1
export RUST_BACKTRACE=1
export NO_COLOR=1   # tracing-subscriber: no ANSI escapes in the daemon logs

# Which boot this is, 1-based (a suite with a "# boots: N" header is booted again on the same
# disks after a power cut).
# Builtins only: this runs in every scenario shell, and a fork costs milliseconds under TCG.
BOOT=1
read -r _cmdline < /proc/cmdline 2>/dev/null
case " $_cmdline " in *" vmtest.boot="*) BOOT=${_cmdline##*vmtest.boot=}; BOOT=${BOOT%% *} ;; esac

now() { cut -d' ' -f1 /proc/uptime; }
say() { echo "[$(now)] $*"; }

# Fail the current scenario. Only meaningful in the scenario's main shell (not in a `( ... ) &`).
fail() {
  say "FAIL: $*"
  [ -s "$T/reason" ] || echo "$*" > "$T/reason"
  exit 1
}

# run CMD...: run and log a command, fail the scenario if it exits non-zero.
run() {
  say "+ $*"
  "$@"
  _rc=$?
  [ $_rc -eq 0 ] || fail "'$*' exited $_rc"
}

# need_ublk: the kernel side must be there, or the scenario fails (never passes vacuously).
need_ublk() {
  [ -c /dev/ublk-control ] || fail "/dev/ublk-control missing (ublk_drv not loaded?)"
  [ -x "$UBLKD" ] || fail "$UBLKD missing from the initramfs"
  [ -x "$UBLKCTL" ] || fail "$UBLKCTL missing from the initramfs"
}

# alive PID: running and not a zombie (a killed child stays in /proc until wait()ed; orphans
# reparented to PID 1 may stay zombies forever).
alive() {
  [ -r "/proc/$1/stat" ] || return 1
  _st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$_st" ] && [ "$_st" != Z ]
}

# Pids of live ublkd processes.
ublkd_pids() {
  for _p in $(pidof ublkd 2>/dev/null); do alive "$_p" && echo "$_p"; done
}
no_ublkd() { [ -z "$(ublkd_pids)" ]; }

# wait_for SECS CMD...: poll CMD every 0.2 s until it succeeds; non-zero after SECS.
wait_for() {
  _deadline=$(( $(cut -d. -f1 /proc/uptime) + $1 )); shift
  while ! "$@" >/dev/null 2>&1; do
    [ "$(cut -d. -f1 /proc/uptime)" -lt "$_deadline" ] || return 1
    sleep 0.2
  done
}

# wait_pid PID SECS: wait() for a child with a deadline (SIGKILL after SECS). Returns its status.
# The watchdog traps TERM to take its sleep down with it (no stray `sleep` left behind).
wait_pid() {
  ( trap 'kill $_s 2>/dev/null; exit 0' TERM
    sleep "$2" & _s=$!; wait $_s
    kill -KILL "$1" 2>/dev/null && echo "wait_pid: killed $1 after $2 s" ) &
  _w=$!
  wait "$1"
  _rc=$?
  kill "$_w" 2>/dev/null
  return $_rc
}

# mkconf FILE VOLUME SIZE REPLICA...: write a ublkd config. Knobs: BS (block_size, 4096),
# QUEUES (1), DEPTH (128), DEVICE_ID (0), LOG_LEVEL (info), STATE_DIR.
mkconf() {
  _f=$1 _vol=$2 _size=$3; shift 3
  _reps=""
  for _r in "$@"; do _reps="$_reps${_reps:+, }{ local = \"$_r\" }"; done
  cat > "$_f" <<EOF
[node]
state_dir = "${STATE_DIR:-/var/lib/ublkd/$SCENARIO}"
control_socket = "$SOCK"
log_level = "${LOG_LEVEL:-info}"

[[volume]]
name = "$_vol"
size = "$_size"
block_size = ${BS:-4096}
queues = ${QUEUES:-1}
depth = ${DEPTH:-128}
device_id = ${DEVICE_ID:-0}
replicas = [ $_reps ]
EOF
  # The runner's cleanup uses the last config to recover a device a killed daemon left behind.
  cp "$_f" "$T/last.conf"
  say "config $_f:"; sed 's/^/    /' "$_f"
}

# start_ublkd CONF: start the daemon in the background (log: $T/ublkd.log); sets DPID.
# UBLKD_BIN picks another ublkd binary (the bench's cost-model variants).
# It is a child of the scenario shell, never of a writer, so killing it orphans nothing we wait on.
start_ublkd() {
  echo "==== $(now) ${UBLKD_BIN:-$UBLKD} --config $1" >> "$T/ublkd.log"
  "${UBLKD_BIN:-$UBLKD}" --config "$1" >> "$T/ublkd.log" 2>&1 &
  DPID=$!
  say "started ublkd pid $DPID"
}

# stop_ublkd [SECS]: SIGINT the daemon started by start_ublkd (drain, remove the devices:
# SIGTERM would leave them to a next ublkd), wait for it; returns its status.
stop_ublkd() {
  kill -INT "$DPID" 2>/dev/null
  wait_pid "$DPID" "${1:-30}"
}

# wait_dev DEV [SECS]: the block device node exists and a direct read of its first block works.
dev_ready() { [ -b "$1" ] && timeout 10 dd if="$1" of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; }
wait_dev() {
  wait_for "${2:-20}" dev_ready "$1" || fail "$1 not ready within ${2:-20}s (see ublkd.log)"
  say "$1 ready"
}

# vol_status VOL: `ublkctl status VOL --output json`, flattened to one line without whitespace.
vol_status() {
  timeout 10 "$UBLKCTL" --socket "$SOCK" status "$1" --output json 2>>"$T/ublkctl.err" | tr -d ' \t\r\n'
}

# Crude JSON access for busybox (no jq). Works on the flattened form; string values must not
# contain braces or brackets (true for our paths and states).
# json_strip_nested: drop every nested {...}/[...] inside the outermost object.
json_strip_nested() {
  sed 's/^{//; s/}$//' | sed -e ':a' -e 's/{[^{}]*}//g; s/\[[^][]*\]//g; ta'
}
# json_top_field KEY: value of a top-level key, quotes removed.
json_top_field() {
  json_strip_nested | tr ',' '\n' | sed -n "s/^\"$1\":\"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" | head -n1
}
# json_replicas: one replica object per line (the elements of the "replicas" array).
json_replicas() {
  awk '{
    i = index($0, "\"replicas\":[")
    if (i == 0) exit
    s = substr($0, i + length("\"replicas\":["))
    depth = 0; cur = ""
    for (k = 1; k <= length(s); k++) {
      c = substr(s, k, 1)
      if (depth == 0 && c == "]") break
      if (c == "{" || c == "[") depth++
      if (c == "}" || c == "]") depth--
      if (depth > 0 || c == "}") cur = cur c
      if (depth == 0 && c == "}") { print cur; cur = "" }
    }
  }'
}
# replica_state JSON INDEX: "online", "faulted", ... of replica INDEX.
replica_state() {
  echo "$1" | json_replicas | while read -r _o; do
    _i=$(echo "$_o" | json_top_field index)
    [ "$_i" = "$2" ] && echo "$_o" | json_top_field state
  done | head -n1
}

# wait_live VOL [SECS]: the daemon answers and reports the volume live.
vol_is_live() { [ "$(vol_status "$1" | json_top_field state)" = live ]; }
wait_live() {
  wait_for "${2:-30}" vol_is_live "$1" || fail "volume $1 not live within ${2:-30}s (status: $(vol_status "$1"))"
  say "volume $1 live"
}

# Kernel log since this scenario started (the runner writes a marker to /dev/kmsg).
dmesg_since_start() { dmesg | awk -v m="vmtest: start $SCENARIO" 'index($0, m) {p = 1} p'; }

# no_kernel_errors DEV: fail if the kernel logged I/O errors for DEV (e.g. ublkb0) or ext4
# errors during this scenario. Errors on a replica device (dm-N) are expected in fault tests.
no_kernel_errors() {
  _e=$(dmesg_since_start | grep -E "I/O error.*dev $1|Buffer I/O error on dev $1|EXT4-fs error|EXT4-fs.*$1.*(error|abort)|BUG:|Oops|WARNING:" | head -n 5)
  [ -z "$_e" ] || fail "kernel errors: $(echo "$_e" | tr '\n' ' ')"
}

# dm_dev NAME: /dev/dm-N of a device-mapper device (no udev, so no /dev/mapper/NAME).
dm_dev() {
  for _d in /sys/block/dm-*; do
    [ "$(cat "$_d/dm/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${_d##*/}"; return 0; }
  done
  return 1
}

# mount_holders DEV: "pid(comm)" of every process that sees a mount of DEV in its mount
# namespace. After our umount this must be empty: a daemon that unshared its mount namespace
# while the filesystem was mounted keeps a private copy of that mount (pinning the device).
# One grep over all of them: a grep per process costs several ms each under TCG, and kernel
# threads count too (nbd alone adds one per /dev/nbdN).
mount_holders() {
  grep -l " - [^ ]* $1 " /proc/[0-9]*/mountinfo 2>/dev/null | while read -r _mi; do
    _p=${_mi#/proc/}; _p=${_p%/mountinfo}
    echo "$_p($(cat /proc/$_p/comm 2>/dev/null))"
  done | tr '\n' ' '
}

# umount_checked DIR DEV: umount, and make sure no other mount namespace still holds DEV.
umount_checked() {
  run "$UMOUNT" "$1"
  _h=$(mount_holders "$2")
  [ -z "$_h" ] || fail "$2 still mounted after umount, in the mount namespace of: $_h"
}

# fsck_clean DEV: e2fsck -fn exits 0 and had the device to itself (a filesystem still mounted
# elsewhere makes e2fsck warn "in use", skip the journal and exit 0 on a stale view).
fsck_clean() {
  say "+ $E2FSCK -fn $1"
  "$E2FSCK" -fn "$1" > "$T/fsck.out" 2>&1
  _rc=$?
  cat "$T/fsck.out"
  [ $_rc -eq 0 ] || fail "e2fsck -fn $1 exited $_rc: $(grep -v '^Pass\|^e2fsck' "$T/fsck.out" | head -n 3 | tr '\n' ' ')"
  ! grep -qE 'is in use|skipping journal recovery' "$T/fsck.out" || fail "e2fsck: $1 still in use after umount"
}

# same_file A B WHAT: fail unless A and B have the same content.
same_file() {
  _a=$(sha256sum < "$1" | cut -d' ' -f1); _b=$(sha256sum < "$2" | cut -d' ' -f1)
  [ "$_a" = "$_b" ] || fail "$3: checksum mismatch ($_a vs $_b)"
}

# fio_ok LOG: fio's report shows no error for any job and no verify failure.
fio_ok() {
  grep -q 'err= *0' "$1" || fail "fio report has no 'err= 0' line (see $(basename "$1"))"
  _bad=$(grep -E 'err= *[1-9]|verify: bad|verify failed|bad magic|io_u error|fio: pid=.*error' "$1" | head -n 3)
  [ -z "$_bad" ] || fail "fio errors: $(echo "$_bad" | tr '\n' ' ')"
}

# stop_daemon_clean: SIGINT the daemon (it removes its devices), expect exit 0.
stop_daemon_clean() {
  stop_ublkd 30
  _rc=$?
  [ $_rc -eq 0 ] || fail "ublkd exited $_rc on SIGINT (expected 0)"
}

# tcp_listening ADDR PORT: a listening socket on ADDR:PORT (IPv4, from /proc/net/tcp).
tcp_listening() {
  _hex=$(echo "$1" | awk -F. '{printf "%02X%02X%02X%02X", $4, $3, $2, $1}')
  grep -q "^ *[0-9]*: $_hex:$(printf %04X "$2") 00000000:0000 0A " /proc/net/tcp
}

# cluster_secret: the secret every ublkd of a scenario shares, $CLUSTER_KEY or $T/cluster.key
# (mode 0600).
cluster_secret() {
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "${CLUSTER_KEY:-$T/cluster.key}")
}

# replica_server N DIR [HOME]: a ublkd that only hosts replicas, on 127.0.0.N:7450, storing in
# DIR; its config HOME.toml and state dir HOME-state (HOME: $T/srvN; on a disk when it must
# outlive a boot). Log $T/srvN.log, LOG_LEVEL and UBLKD_BIN honoured, the secret
# $CLUSTER_KEY ($T/cluster.key). Sets SRV_N to its pid.
replica_server() {
  _h=${3:-$T/srv$1}
  cat > "$_h.toml" <<EOF
[node]
state_dir = "$_h-state"
control_socket = "$T/srv$1.sock"
cluster_secret_file = "${CLUSTER_KEY:-$T/cluster.key}"
log_level = "${LOG_LEVEL:-info}"

[server]
listen = "127.0.0.$1:7450"
storage_dir = "$2"
EOF
  "${UBLKD_BIN:-$UBLKD}" --config "$_h.toml" >> "$T/srv$1.log" 2>&1 &
  eval "SRV_$1=$!"
  wait_for 20 tcp_listening 127.0.0.$1 7450 || fail "replica server $1 did not start: $(tail -n 5 "$T/srv$1.log")"
  say "replica server 127.0.0.$1:7450 pid $(eval echo \$SRV_$1)"
}

# power_cut: the power goes out now. sysrq b resets the guest at once: no sync, no unmount,
# whatever the guest had not yet sent to its disks (page cache, queued requests) is lost, as
# in a power cut. (What it had sent survives: qemu writes the disk images through, so the
# emulated disks have no volatile cache to lose.) The host boots the guest again on the same
# disks; the scenario runs again with $BOOT one higher.
power_cut() {
  echo "@@CUT $SCENARIO boot $BOOT" > /dev/console
  sleep 1   # the marker leaves the serial port before the reset
  echo b > /proc/sysrq-trigger
  sleep 30
  fail "sysrq b did not reset the guest"
}

# drop_caches: make the next reads go to the device (i.e. through ublkd), not the page cache.
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# ---------------------------------------------------------------------------------------------
# Runner (called from /init).
# ---------------------------------------------------------------------------------------------

# Leave the guest as the next scenario expects it, whatever this one did: no stray processes,
# no mounts, no ublk/dm/loop devices. Best effort; prints what it had to do.
cleanup_scenario() {
  _pg=$1
  # Everything else in the scenario's process group (writers, fio), but not the daemon yet: with
  # a filesystem still mounted on its device it must stay up to let the umount flush.
  # Builtins only per process (a fork costs several ms under TCG, and there are ~80 processes,
  # most of them kernel threads).
  _ud=" $(ublkd_pids | tr '\n' ' ') "
  for _p in /proc/[0-9]*; do
    _p=${_p#/proc/}
    _st=""; read -r _st 2>/dev/null < "/proc/$_p/stat" || continue
    set -- ${_st##*) }          # after "pid (comm) ": state ppid pgrp ...
    [ "$3" = "$_pg" ] || continue
    case "$_ud" in *" $_p "*) continue ;; esac
    _c=$(cat /proc/$_p/comm 2>/dev/null)
    kill -KILL "$_p" 2>/dev/null && echo "cleanup: killed leftover pid $_p ($_c)"
  done
  # A device left QUIESCED by a killed daemon blocks every I/O (umount would hang): recover it.
  if ls /sys/class/ublk-char/ 2>/dev/null | grep -q ublkc && [ -z "$(ublkd_pids)" ] && [ -f "$T/last.conf" ]; then
    echo "cleanup: ublk devices but no daemon: recovering with $T/last.conf"
    "$UBLKD" --config "$T/last.conf" >> "$T/ublkd-cleanup.log" 2>&1 &
    sleep 3
  fi
  for _m in $(awk '$2 ~ /^\/mnt\// {print $2}' /proc/mounts | sort -r); do
    echo "cleanup: umount $_m"
    timeout 30 "$UMOUNT" "$_m" || echo "cleanup: umount $_m failed"
  done
  for _p in $(ublkd_pids); do
    echo "cleanup: SIGINT ublkd $_p (it removes its devices)"
    kill -INT "$_p"
  done
  wait_for 20 no_ublkd
  for _p in $(ublkd_pids); do echo "cleanup: SIGKILL ublkd $_p"; kill -KILL "$_p"; done
  # md arrays and nbd devices (bench_mdraid1) hold loop/virtio devices: stop them before the
  # loop devices go. The NBD server died with the process group, so md's last superblock write
  # to the nbd member fails fast (EIO) instead of hanging. Shell builtins only on the common
  # path: every fork costs several ms under TCG, and this runs after each scenario.
  _mds=""
  if [ -r /proc/mdstat ]; then
    while read -r _l; do
      case "$_l" in md[0-9]*" : "*) _mds="$_mds ${_l%% *}" ;; esac
    done < /proc/mdstat
  fi
  for _md in $_mds; do
    echo "cleanup: mdadm --stop /dev/$_md"
    timeout 30 "$MDADM" --stop "/dev/$_md" >/dev/null 2>&1 || echo "cleanup: mdadm --stop /dev/$_md failed"
  done
  for _n in /sys/block/nbd*; do
    _sz=0; read -r _sz 2>/dev/null < "$_n/size"
    [ "${_sz:-0}" != 0 ] || continue    # 0 = not connected
    echo "cleanup: nbd-client -d /dev/${_n##*/}"
    timeout 20 "$NBD_CLIENT" -d "/dev/${_n##*/}" >/dev/null 2>&1 || echo "cleanup: nbd-client -d /dev/${_n##*/} failed"
  done
  timeout 20 "$DMSETUP" remove_all --force >/dev/null 2>&1
  timeout 20 "$LOSETUP" -D >/dev/null 2>&1
  if ls /sys/class/ublk-char/ 2>/dev/null | grep -q ublkc; then
    echo "@@WARN leftover ublk devices after $SCENARIO: $(ls /sys/class/ublk-char/ | tr '\n' ' ')"
  fi
}

# Diagnostics for a failed scenario, between markers the host extracts.
print_diag() {
  echo "@@LOG BEGIN $SCENARIO"
  echo "--- scenario log (last 60 lines) ---"; tail -n 60 "$T/scenario.log"
  for _l in "$T"/ublkd*.log "$T"/ublkctl.err "$T"/*.fio.log; do
    [ -s "$_l" ] || continue
    echo "--- $(basename "$_l") (last 60 lines) ---"; tail -n 60 "$_l"
  done
  echo "--- ublk devices ---"; ls /sys/class/ublk-char/ /dev/ 2>&1 | grep -E 'ublk' | tr '\n' ' '; echo
  echo "--- processes seeing a ublk mount (before cleanup): $_holders"
  echo "--- dmesg since start (last 40 lines) ---"; dmesg_since_start | tail -n 40
  echo "@@LOG END $SCENARIO"
}

run_one() {
  SCENARIO=$1
  T=/tmp/t/$SCENARIO
  rm -rf "$T"; mkdir -p "$T"
  export SCENARIO T
  eval "_to=\${timeout_$SCENARIO:-$DEFAULT_TIMEOUT}"
  echo "vmtest: start $SCENARIO" > /dev/kmsg
  echo "@@START $SCENARIO"
  _t0=$(cut -d. -f1 /proc/uptime)
  # Output goes to the console live (via tee) and to scenario.log for the failure report.
  mkfifo "$T/out"
  tee "$T/scenario.log" < "$T/out" &
  _tee=$!
  # setsid: own process group, so the timeout can kill the whole scenario (pid == pgid).
  setsid /bin/sh -c ". /tests/lib.sh; . /tests/suites/$SUITE.sh; cd \$T; $SCENARIO" > "$T/out" 2>&1 < /dev/null &
  _pid=$!
  ( trap 'kill $_s 2>/dev/null; exit 0' TERM
    sleep "$_to" & _s=$!; wait $_s
    if alive "$_pid"; then echo "timed out after ${_to}s" > "$T/timeout"; kill -KILL -- "-$_pid"; fi ) &
  _wd=$!
  wait "$_pid"
  _rc=$?
  kill "$_wd" 2>/dev/null
  _secs=$(( $(cut -d. -f1 /proc/uptime) - _t0 ))
  if [ -f "$T/timeout" ]; then _verdict=FAIL; _reason=$(cat "$T/timeout")
  elif [ $_rc -eq 0 ]; then _verdict=PASS; _reason=""
  else _verdict=FAIL; _reason=$(cat "$T/reason" 2>/dev/null); _reason=${_reason:-exit status $_rc}
  fi
  _holders=$(mount_holders '/dev/ublkb[0-9]*')
  # Stragglers in the group still hold the fifo: the cleanup kills them, then tee sees EOF.
  cleanup_scenario "$_pid" > "$T/cleanup.log" 2>&1
  sleep 0.2; kill "$_tee" 2>/dev/null; wait "$_tee" 2>/dev/null
  cat "$T/cleanup.log"
  [ $_verdict = PASS ] || print_diag
  # The guest's /tmp is RAM: a passed scenario's images (hundreds of MiB each) would fill it
  # for the scenarios after it. A failed one keeps its files for the diagnosis.
  if [ $_verdict = PASS ]; then rm -f "$T"/*.img "$T"/*/*.img "$T"/*/*/*.img; fi
  echo "@@RESULT $_verdict $SCENARIO $_secs $(echo "$_reason" | tr '\n' ' ' | cut -c1-300)"
}

run_suite() {
  . "/tests/suites/$SUITE.sh"
  # REQUESTED comes from /etc/vmtest.env (run SUITE SCENARIO...); empty = the whole suite.
  _list=${REQUESTED:-$SCENARIOS}
  echo "@@PLAN $_list"
  for _s in $_list; do
    if ! type "$_s" >/dev/null 2>&1; then
      echo "@@RESULT FAIL $_s 0 no such scenario in suite $SUITE"
      continue
    fi
    run_one "$_s"
  done
}
