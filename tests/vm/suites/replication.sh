# timeout: 1500
# disks: 3 size=1G
#
# Remote replicas on the real ublk driver. Three ublkd processes in one guest, each with its
# own config and state dir: the owner serves /dev/ublkb0 from 1 local + 2 remote replicas; two
# replica servers listen on 127.0.0.2:7450 and 127.0.0.3:7450 (real TCP over loopback, shared
# cluster secret). Every scenario checks data (fio verify=crc32c, checksums, e2fsck) and, after
# a clean stop of the owner, that every surviving replica is byte-identical to the local one.

SCENARIOS="repl_fio_sigkill repl_both_remotes_die repl_fio_sigstop repl_ext4_kill repl_restart repl_rebuild_reload repl_ha repl_ha_rules repl_ha_disk repl_owner_kill9 repl_fence repl_stale_recover repl_lost_state_dir repl_overlap"
timeout_repl_fio_sigkill=300
timeout_repl_both_remotes_die=400
timeout_repl_fio_sigstop=300
timeout_repl_ext4_kill=300
timeout_repl_restart=600
timeout_repl_rebuild_reload=400
timeout_repl_ha=500
timeout_repl_ha_rules=700
timeout_repl_ha_disk=400
timeout_repl_fence=240
timeout_repl_owner_kill9=300
timeout_repl_stale_recover=240
timeout_repl_lost_state_dir=300
timeout_repl_overlap=240

DEV=/dev/ublkb0
VOL=rv
IO_TIMEOUT_MS=1500

# owner_conf FILE DEVICE_ID STATE_DIR SOCKET REPLICAS [VOLUME_LINE]: an owner config for
# volume $VOL (VOLUME_LINE: one more key of the volume, e.g. its spares).
owner_conf() {
  cat > "$1" <<EOF
[node]
state_dir = "$3"
control_socket = "$4"
cluster_secret_file = "$T/cluster.key"
io_timeout_ms = $IO_TIMEOUT_MS

[[volume]]
name = "$VOL"
size = "256MiB"
block_size = 4096
device_id = $2
${6:-}
replicas = [ $5 ]
EOF
  say "config $1:"; sed 's/^/    /' "$1"
}

# start_second_owner REPLICAS: another owner of volume $VOL (device 1, own state dir and
# socket $T/b.sock, log $T/ublkd-b.log); sets BPID.
start_second_owner() {
  owner_conf "$T/b.conf" 1 "$T/state-b" "$T/b.sock" "$1"
  "$UBLKD" --config "$T/b.conf" >> "$T/ublkd-b.log" 2>&1 &
  BPID=$!
}

vol_fenced() { [ "$(vol_status $VOL | json_top_field state)" = fenced ]; }

# setup: secret, two servers, the owner serving $DEV from 1 local + 2 remote replicas.
setup() {
  need_ublk
  cluster_secret
  replica_server 2 "$T/srv2/replicas"
  replica_server 3 "$T/srv3/replicas"
  owner_conf "$T/ublkd.conf" 0 "$T/state" "$SOCK" \
    "{ local = \"$T/local.img\" }, { remote = \"127.0.0.2:7450\", id = \"rv-a\" }, { remote = \"127.0.0.3:7450\", id = \"rv-b\" }"
  cp "$T/ublkd.conf" "$T/last.conf"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV 60
  wait_live $VOL
}

# expect_replica INDEX STATE: replica INDEX of $VOL is in STATE (waits a little: faults are async).
replica_is() { [ "$(replica_state "$(vol_status $VOL)" "$1")" = "$2" ]; }
expect_replica() {
  wait_for 10 replica_is "$1" "$2" || fail "replica $1 is not $2: $(vol_status $VOL)"
}

# same_replicas IMG...: after a clean owner stop, every given image holds the same data as
# the local one (the 256 MiB of the volume; each replica's label after it is its own).
same_replicas() {
  for _i in "$@"; do
    # -s: busybox cmp lists every differing byte otherwise (minutes for a bad replica).
    cmp -s -n $((256 << 20)) "$T/local.img" "$_i" \
      || fail "replica $_i differs from the local replica: $(cmp -n $((256 << 20)) "$T/local.img" "$_i" 2>&1 | head -n 1)"
  done
  say "replicas identical: local.img $*"
}

# fio_bg NAME [SIZE]: 4k randwrite QD32 with crc32c verify over SIZE (96M) of $DEV, in the
# background.
fio_bg() {
  "$FIO" --name="$1" --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
    --direct=1 --size=${2:-96M} --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --output="$T/$1.fio.log" &
  FIO_PID=$!
}

# ---------------------------------------------------------------------------------------------
# A replica server is SIGKILLed while fio writes: no error reaches fio, the replica is faulted,
# the data verifies, and the other remote replica holds exactly what the local one holds.
repl_fio_sigkill() {
  setup
  fio_bg kill
  sleep 4
  say "SIGKILL replica server 3 (pid $SRV_3)"
  kill -KILL "$SRV_3"
  wait "$FIO_PID" || fail "fio failed: $(tail -n 20 "$T/kill.fio.log")"
  cat "$T/kill.fio.log"
  fio_ok "$T/kill.fio.log"
  expect_replica 0 online
  expect_replica 1 online
  expect_replica 2 faulted
  stop_daemon_clean
  same_replicas "$T/srv2/replicas/rv-a.img"
  no_kernel_errors ublkb0
}

# Both replica servers of a volume with two remote replicas are SIGKILLed together under fio
# verify and come back 1 s and 7 s later (a rack power cycle, a switch reboot; issue 16 A and
# Q): whichever way the owner saw the two losses (both under one request, or one after the
# other with the second one's label missing the first one's fault), fio sees no error, the
# volume serves again from a replica holding every acknowledged write, the other is caught up
# by a partial rebuild, and the two end byte-identical.
both_online() { replica_is 0 online && replica_is 1 online; }
repl_both_remotes_die() {
  need_ublk
  cluster_secret
  replica_server 2 "$T/srv2/replicas"
  replica_server 3 "$T/srv3/replicas"
  owner_conf "$T/ublkd.conf" 0 "$T/state" "$SOCK" \
    '{ remote = "127.0.0.2:7450", id = "bd-a" }, { remote = "127.0.0.3:7450", id = "bd-b" }'
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV 60
  wait_live $VOL
  fio_bg both 64M
  sleep 4
  say "SIGKILL both replica servers (pids $SRV_2 $SRV_3)"
  kill -KILL "$SRV_2" "$SRV_3"
  wait "$SRV_2" "$SRV_3" 2>/dev/null
  sleep 1
  say "restart server 2"
  replica_server 2 "$T/srv2/replicas"
  sleep 6
  say "restart server 3"
  replica_server 3 "$T/srv3/replicas"
  wait "$FIO_PID" || fail "fio failed: $(tail -n 20 "$T/both.fio.log")"
  fio_ok "$T/both.fio.log"
  say "what the owner saw:"
  grep -E "faulted|connecting|lags|not current|rebooted|resync|rebuild" \
    "$T/ublkd.log" | cut -c1-200 | tail -n 12 | sed 's/^/    /'
  wait_for 180 both_online || fail "not both online: $(vol_status $VOL)"
  stop_daemon_clean
  cmp -s -n $((256 << 20)) "$T/srv2/replicas/bd-a.img" "$T/srv3/replicas/bd-b.img" \
    || fail "the two replicas differ after the rebuild"
  say "replicas identical: bd-a bd-b"
  no_kernel_errors ublkb0
}

# A replica server is SIGSTOPped (hangs without closing its socket): after the deadline it is
# faulted and I/O carries on, no error to fio. SIGCONT: it reconnects and a partial rebuild
# copies what it missed; then it holds what the others hold.
repl_fio_sigstop() {
  setup
  fio_bg stop
  sleep 4
  say "SIGSTOP replica server 2 (pid $SRV_2)"
  kill -STOP "$SRV_2"
  wait "$FIO_PID"; _rc=$?
  kill -CONT "$SRV_2"
  [ $_rc -eq 0 ] || fail "fio failed: $(tail -n 20 "$T/stop.fio.log")"
  cat "$T/stop.fio.log"
  fio_ok "$T/stop.fio.log"
  grep -q "replica faulted.*missed the I/O deadline" "$T/ublkd.log" \
    || fail "fault reason is not the deadline: $(grep 'replica faulted' "$T/ublkd.log")"
  expect_replica 2 online
  wait_for 120 replica_is 1 online || fail "replica 1 not rebuilt: $(vol_status $VOL)"
  grep -q "rebuild done" "$T/ublkd.log" || fail "no rebuild in the log"
  stop_daemon_clean
  same_replicas "$T/srv2/replicas/rv-a.img" "$T/srv3/replicas/rv-b.img"
  no_kernel_errors ublkb0
}

# ext4 through the replicated volume, a server killed mid-write: the filesystem stays clean and
# the files read back intact (from the device, not the page cache).
repl_ext4_kill() {
  setup
  run "$MKFS_EXT4" -q -F $DEV
  mkdir -p /mnt/r
  run "$MOUNT" $DEV /mnt/r
  run dd if=/dev/urandom of="$T/pat" bs=1M count=8
  (for i in 1 2 3 4 5 6; do cp "$T/pat" /mnt/r/f$i; sync; done) &
  _w=$!
  sleep 3
  say "SIGKILL replica server 2 (pid $SRV_2)"
  kill -KILL "$SRV_2"
  wait $_w || fail "writes to ext4 failed"
  umount_checked /mnt/r $DEV
  drop_caches
  run "$MOUNT" -o ro $DEV /mnt/r
  for i in 1 2 3 4 5 6; do same_file "$T/pat" /mnt/r/f$i "f$i"; done
  umount_checked /mnt/r $DEV
  fsck_clean $DEV
  expect_replica 1 faulted
  stop_daemon_clean
  same_replicas "$T/srv3/replicas/rv-b.img"
  no_kernel_errors ublkb0
}

# Owner restart: the generation goes up, the remote replicas are taken back online with their
# data. A killed server that comes back is reconnected and caught up by a rebuild.
repl_restart() {
  setup
  _g1=$(vol_status $VOL | json_top_field generation)
  run dd if=/dev/urandom of="$T/pat" bs=1M count=4
  run dd if="$T/pat" of=$DEV bs=1M seek=16 oflag=direct conv=fsync
  stop_daemon_clean
  same_replicas "$T/srv2/replicas/rv-a.img" "$T/srv3/replicas/rv-b.img"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV 60
  wait_live $VOL
  _g2=$(vol_status $VOL | json_top_field generation)
  [ "$_g2" -gt "$_g1" ] || fail "generation did not go up: $_g1 -> $_g2"
  for i in 0 1 2; do expect_replica $i online; done
  run dd if=$DEV of="$T/rb" bs=1M skip=16 count=4 iflag=direct
  same_file "$T/pat" "$T/rb" "data after owner restart"

  say "SIGKILL replica server 3, write, restart it"
  kill -KILL "$SRV_3"; wait "$SRV_3" 2>/dev/null
  run dd if=/dev/urandom of=$DEV bs=1M seek=32 count=4 oflag=direct conv=fsync
  expect_replica 2 faulted
  replica_server 3 "$T/srv3/replicas"
  wait_for 20 grep -q "replica reachable again" "$T/ublkd.log" \
    || fail "owner did not reconnect to the restarted server"
  run dd if=/dev/urandom of=$DEV bs=1M seek=40 count=4 oflag=direct conv=fsync
  wait_for 120 replica_is 2 online || fail "replica 2 not rebuilt: $(vol_status $VOL)"
  # Partial: what it missed (4 MiB while down, up to 4 more before the rebuild began),
  # never the volume.
  last_rebuild_is partial $((4 << 20)) $((9 << 20))
  "$UBLKCTL" --socket "$SOCK" rebuild watch $VOL | grep -q "no rebuild running" \
    || fail "rebuild watch: $("$UBLKCTL" --socket "$SOCK" rebuild watch $VOL 2>&1)"

  say "SIGKILL replica server 3, write, stop the owner, bring both back: still partial"
  kill -KILL "$SRV_3"; wait "$SRV_3" 2>/dev/null
  run dd if=/dev/urandom of=$DEV bs=1M seek=64 count=2 oflag=direct conv=fsync
  expect_replica 2 faulted
  stop_daemon_clean
  replica_server 3 "$T/srv3/replicas"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV 60
  grep -q "dirty map kept across the restart" "$T/ublkd.log" || fail "the dirty map was not kept"
  wait_for 120 replica_is 2 online || fail "replica 2 not rebuilt after the restart: $(vol_status $VOL)"
  last_rebuild_is partial $((2 << 20)) $((3 << 20))
  stop_daemon_clean
  same_replicas "$T/srv2/replicas/rv-a.img" "$T/srv3/replicas/rv-b.img"
  no_kernel_errors ublkb0
}

# last_rebuild_is KIND MIN MAX: the newest entry of the rebuild history is a finished KIND
# rebuild that copied between MIN and MAX bytes.
# fio_loop_start DIR / fio_loop_stop: fio with crc32c verify on a 32M file in DIR, one run after
# the other until stopped; the stop fails the scenario if any run failed.
fio_loop_start() {
  rm -f "$T/fio.stop" "$T/fio.failed"
  (n=0; while [ ! -e "$T/fio.stop" ]; do
     n=$((n + 1))
     # One file, rewritten by every run: the volume never fills.
     "$FIO" --name=v$n --filename="$1/fio.dat" --rw=randwrite --bs=4k --size=32M --iodepth=16 \
       --ioengine=io_uring --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
       --output="$T/loop.fio.log" || { cp "$T/loop.fio.log" "$T/fio.failed"; break; }
   done) &
  FIO_LOOP=$!
}
fio_loop_stop() {
  touch "$T/fio.stop"
  wait $FIO_LOOP
  [ -e "$T/fio.failed" ] && fail "fio failed: $(tail -n 20 "$T/fio.failed")"
  fio_ok "$T/loop.fio.log"
}

# ext4_under_fio: a fresh ext4 on $DEV mounted on /mnt/r, the fio loop running in it for 5 s.
ext4_under_fio() {
  run "$MKFS_EXT4" -q -F $DEV
  mkdir -p /mnt/r
  run "$MOUNT" $DEV /mnt/r
  fio_loop_start /mnt/r
  sleep 5
}

# verified_and_clean: `ublkctl verify` finds the replicas identical, then $DEV is unmounted
# from /mnt/r and e2fsck finds it clean.
verified_and_clean() {
  "$UBLKCTL" --socket "$SOCK" verify $VOL > "$T/verify.out" 2>&1 || fail "verify: $(cat "$T/verify.out")"
  grep -q "replicas identical" "$T/verify.out" || fail "verify: $(cat "$T/verify.out")"
  # A repair's named source must be one of the volume's replicas: refused, with the list.
  "$UBLKCTL" --socket "$SOCK" verify --repair --from '#9' $VOL > "$T/verify.out" 2>&1 \
    && fail "verify --from #9 was accepted: $(cat "$T/verify.out")"
  grep -q 'no replica "#9"' "$T/verify.out" || fail "verify --from #9: $(cat "$T/verify.out")"
  umount_checked /mnt/r $DEV
  fsck_clean $DEV
}

last_rebuild_is() {
  _h=$("$UBLKCTL" --socket "$SOCK" --output json rebuild history $VOL | tr -d ' \n')
  # The entries are objects in an array, oldest first: keep the last one.
  _last=$(echo "$_h" | sed 's/.*},{/{/')
  say "last rebuild: $_last"
  case "$_last" in *"\"rebuild\":\"$1\""*) ;; *) fail "last rebuild is not $1: $_h" ;; esac
  case "$_last" in *'"outcome":"done"'*) ;; *) fail "last rebuild did not finish: $_h" ;; esac
  _b=$(echo "$_last" | sed -n 's/.*"bytes":\([0-9]*\).*/\1/p')
  [ -n "$_b" ] && [ "$_b" -ge "$2" ] && [ "$_b" -le "$3" ] || fail "last rebuild copied $_b bytes, expected $2..$3"
}

# ext4 mounted, fio verifying in a loop: a remote replica server is killed, restarted and
# caught up by a partial rebuild; then the config replaces that replica by one on a third
# server and `ublkctl reload` applies it: the new one is fully rebuilt and the old one dropped.
# fio sees no error, `ublkctl verify` finds the replicas identical, e2fsck is clean.
repl_rebuild_reload() {
  setup
  ext4_under_fio
  say "SIGKILL replica server 3, restart it after 5 s"
  kill -KILL "$SRV_3"; wait "$SRV_3" 2>/dev/null
  expect_replica 2 faulted
  sleep 5
  replica_server 3 "$T/srv3/replicas"
  wait_for 120 replica_is 2 online || fail "replica 2 not caught up: $(vol_status $VOL)"
  last_rebuild_is partial 1 $((256 << 20))
  _partial=$_b
  [ "$_partial" -lt $((200 << 20)) ] || fail "the partial rebuild copied nearly everything ($_partial bytes)"

  say "replace rv-b on server 3 by rv-c on server 4, by config and reload"
  replica_server 4 "$T/srv4/replicas"
  sed -i 's/{ remote = "127.0.0.3:7450", id = "rv-b" }/{ remote = "127.0.0.4:7450", id = "rv-c" }/' "$T/ublkd.conf"
  cp "$T/ublkd.conf" "$T/last.conf"
  "$UBLKCTL" --socket "$SOCK" reload > "$T/reload.out" 2>&1 || fail "reload: $(cat "$T/reload.out")"
  cat "$T/reload.out"
  grep -q "replaced by rv-c@127.0.0.4:7450" "$T/reload.out" || fail "reload did not replace: $(cat "$T/reload.out")"
  wait_for 180 eval '[ "$(vol_status $VOL | json_replicas | grep "rv-c@127.0.0.4" | json_top_field state)" = online ]' \
    || fail "the replacement is not online: $(vol_status $VOL)"
  wait_for 20 eval '! vol_status $VOL | json_replicas | grep -q "rv-b@127.0.0.3"' || fail "the replaced replica is still there: $(vol_status $VOL)"
  # Every region once, and again where a write straddled the copied and the uncopied part
  # (it skipped the rebuilding target and marked its copied part again): at most 1.1 x.
  last_rebuild_is full $((256 << 20)) $((256 * 11 / 10 << 20))
  # A size change is refused, and changes nothing.
  sed 's/size = "256MiB"/size = "512MiB"/' "$T/ublkd.conf" > "$T/bigger.conf"
  cp "$T/ublkd.conf" "$T/good.conf"; cp "$T/bigger.conf" "$T/ublkd.conf"
  "$UBLKCTL" --socket "$SOCK" reload > "$T/reload2.out" 2>&1 && fail "a size change was accepted"
  grep -q "size cannot change" "$T/reload2.out" || fail "size change not refused by name: $(cat "$T/reload2.out")"
  cp "$T/good.conf" "$T/ublkd.conf"

  fio_loop_stop
  verified_and_clean
  stop_daemon_clean
  same_replicas "$T/srv2/replicas/rv-a.img" "$T/srv4/replicas/rv-c.img"
  no_kernel_errors ublkb0
}

# The HA monitor, end to end. ext4 mounted on $DEV (1 local + 2 remote replicas, spare server
# 4), fio verifying: replica server 3 is SIGKILLed for good. Once it has failed its probes for
# [ha] grace_ms (default 5 s), the monitor creates rv-b anew on the spare, the running device
# takes it as a full-rebuild target, and the dead one is dropped once the new one is online.
# fio sees no error; status shows the substitution; the events tell the story; the dead
# server's return is reported stale and changes nothing, its storage stays until `replica
# reclaim` deletes it (only it); verify and e2fsck are clean; an owner restart with the
# unchanged config keeps the replacement.
repl_ha() {
  need_ublk
  cluster_secret
  replica_server 2 "$T/srv2/replicas"
  replica_server 3 "$T/srv3/replicas"
  replica_server 4 "$T/srv4/replicas"
  owner_conf "$T/ublkd.conf" 0 "$T/state" "$SOCK" \
    "{ local = \"$T/local.img\" }, { remote = \"127.0.0.2:7450\", id = \"rv-a\" }, { remote = \"127.0.0.3:7450\", id = \"rv-b\" }" \
    'spares = [ "127.0.0.4:7450" ]'
  cp "$T/ublkd.conf" "$T/last.conf"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV 60
  wait_live $VOL
  ext4_under_fio
  say "SIGKILL replica server 3 for good"
  _t0=$(now)
  kill -KILL "$SRV_3"; wait "$SRV_3" 2>/dev/null
  has_new() { vol_status $VOL | json_replicas | grep -q 'rv-b@127.0.0.4:7450'; }
  wait_for 60 has_new || fail "no replacement on the spare: $(vol_status $VOL); $("$UBLKCTL" --socket "$SOCK" events)"
  _t1=$(now)
  say "replacement taking writes $(awk -v a="$_t0" -v b="$_t1" 'BEGIN { printf "%.1f", b - a }') s after the SIGKILL"
  new_online() { [ "$(vol_status $VOL | json_replicas | grep 'rv-b@127.0.0.4' | json_top_field state)" = online ]; }
  wait_for 300 new_online || fail "the replacement is not online: $(vol_status $VOL)"
  wait_for 20 eval '! vol_status $VOL | json_replicas | grep -q "rv-b@127.0.0.3"' \
    || fail "the dead replica is still in the set: $(vol_status $VOL)"
  say "redundancy restored $(awk -v a="$_t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s after the SIGKILL"
  "$UBLKCTL" --socket "$SOCK" status $VOL > "$T/status.out"
  cat "$T/status.out"
  grep -q "differs from the config: rv-b@127.0.0.4:7450 runs in place of rv-b@127.0.0.3:7450" "$T/status.out" \
    || fail "status does not show the substitution: $(cat "$T/status.out")"
  # The monitor records the drop at its next round (up to a probe interval later).
  wait_for 10 eval '"$UBLKCTL" --socket "$SOCK" events | grep -q "rv-b@127.0.0.4:7450 is online"' \
    || fail "no event \"rv-b@127.0.0.4:7450 is online\": $("$UBLKCTL" --socket "$SOCK" events)"
  "$UBLKCTL" --socket "$SOCK" events > "$T/events.out"
  cat "$T/events.out"
  for _e in "peer 127.0.0.3:7450 declared dead" "replaced by rv-b@127.0.0.4:7450 on 127.0.0.4:7450 because its server 127.0.0.3:7450 is dead" "rv-b@127.0.0.4:7450 is online" "rv-b@127.0.0.4:7450: full rebuild started" "rv-b@127.0.0.4:7450: full rebuild done"; do
    grep -q "$_e" "$T/events.out" || fail "no event \"$_e\""
  done
  "$UBLKCTL" --socket "$SOCK" replica accept $VOL > "$T/accept.out"
  grep -q 'remote = "127.0.0.4:7450", id = "rv-b"' "$T/accept.out" || fail "accept: $(cat "$T/accept.out")"
  say "the dead server comes back: its replica is stale and stays out"
  replica_server 3 "$T/srv3/replicas"
  wait_for 30 eval '"$UBLKCTL" --socket "$SOCK" events | grep -q "stale, not used"' \
    || fail "no stale event: $("$UBLKCTL" --socket "$SOCK" events | tail -n 5)"
  vol_status $VOL | json_replicas | grep -q "rv-b@127.0.0.3" && fail "the stale replica came back into the set"
  [ -e "$T/srv3/replicas/rv-b.img" ] || fail "the stale replica's storage went without a reclaim"
  "$UBLKCTL" --socket "$SOCK" status $VOL | grep -q "retired: rv-b@127.0.0.3:7450 since .*(replaced by rv-b@127.0.0.4:7450)" \
    || fail "status does not list the retired replica: $("$UBLKCTL" --socket "$SOCK" status $VOL)"
  say "reclaim the stale replica's storage (under fio)"
  "$UBLKCTL" --socket "$SOCK" replica reclaim $VOL > "$T/reclaim.out" || fail "reclaim: $(cat "$T/reclaim.out")"
  cat "$T/reclaim.out"
  grep -q "rv-b@127.0.0.3:7450 (replaced by rv-b@127.0.0.4:7450): deleted" "$T/reclaim.out" || fail "reclaim: $(cat "$T/reclaim.out")"
  [ -e "$T/srv3/replicas/rv-b.img" ] && fail "the stale replica's image is still on server 3"
  [ -e "$T/srv4/replicas/rv-b.img" ] || fail "the reclaim touched the replacement"
  "$UBLKCTL" --socket "$SOCK" events | grep -q "rv-b@127.0.0.3:7450: retired replica's storage reclaimed" || fail "no reclaim event"
  "$UBLKCTL" --socket "$SOCK" status $VOL | grep -q "retired:" && fail "still listed as retired after the reclaim"
  "$UBLKCTL" --socket "$SOCK" replica reclaim $VOL > "$T/reclaim2.out" 2>&1 && fail "a second reclaim found something: $(cat "$T/reclaim2.out")"
  grep -q "nothing to reclaim" "$T/reclaim2.out" || fail "second reclaim: $(cat "$T/reclaim2.out")"
  fio_loop_stop
  verified_and_clean
  stop_daemon_clean
  same_replicas "$T/srv2/replicas/rv-a.img" "$T/srv4/replicas/rv-b.img"
  say "owner restart with the same config: the replacement is kept"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV 60
  wait_live $VOL
  for i in 0 1 2; do expect_replica $i online; done
  vol_status $VOL | json_replicas | grep -q 'rv-b@127.0.0.4:7450' || fail "the restart undid the replacement: $(vol_status $VOL)"
  stop_daemon_clean
  no_kernel_errors ublkb0
}

# The HA monitor's rules, under ext4 + fio verify, rebuilds slowed to 4 MiB/s:
# 1. server 2 stopped for 2 s, continued for 1 s, five times: suspected, never declared dead,
#    nothing replaced;
# 2. server 3 killed, no spares: the volume stays degraded and says why;
# 3. a reload adds a spare: the replacement is placed on it;
# 4. server 3 comes back before the replacement is online: its replica lacks less than the
#    half-built one, which is dropped (partial instead of full);
# 5. server 3 killed again, the replacement placed again, the owner SIGKILLed while it is
#    rebuilt: the restarted owner takes the device back and finishes the replacement.
# fio sees no error throughout; verify and e2fsck are clean; the survivors are identical.
repl_ha_rules() {
  need_ublk
  cluster_secret
  for i in 2 3 4; do replica_server $i "$T/srv$i/replicas"; done
  owner_conf "$T/ublkd.conf" 0 "$T/state" "$SOCK" \
    "{ local = \"$T/local.img\" }, { remote = \"127.0.0.2:7450\", id = \"rv-a\" }, { remote = \"127.0.0.3:7450\", id = \"rv-b\" }"
  printf '[rebuild]\nrate = "4MiB"\n' >> "$T/ublkd.conf"
  cp "$T/ublkd.conf" "$T/last.conf"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV 60
  wait_live $VOL
  ext4_under_fio
  events() { "$UBLKCTL" --socket "$SOCK" events; }

  # Stopped 2 s, each stop outlasts the I/O deadline (1.5 s): the replica connection, which
  # stands for the HA probes while it is up, misses it and the replica is faulted; the
  # monitor probes the server from then on (and suspects it if a probe fails too).
  say "1. server 2 flaps (SIGSTOP 2 s, SIGCONT 1 s) for 15 s"
  for _i in 1 2 3 4 5; do
    kill -STOP "$SRV_2"; sleep 2; kill -CONT "$SRV_2"; sleep 1
  done
  sleep 3
  events | grep -Eq "rv-a@127.0.0.2:7450: faulted: missed the I/O deadline|peer 127.0.0.2:7450 suspected" \
    || fail "the stops were not noticed: $(events)"
  events | grep -q "127.0.0.2:7450 declared dead" && fail "a flapping server was declared dead: $(events)"
  vol_status $VOL | grep -q '"substitutions"' && fail "something was replaced: $(vol_status $VOL)"

  say "2. server 3 killed, no spare"
  kill -KILL "$SRV_3"; wait "$SRV_3" 2>/dev/null
  wait_for 30 eval 'events | grep -q "needs a replacement (its server 127.0.0.3:7450 is dead) but no spares configured"' \
    || fail "no degraded-without-spare event: $(events)"
  "$UBLKCTL" --socket "$SOCK" ha status > "$T/ha.out"; cat "$T/ha.out"
  grep -q "server 127.0.0.3:7450 *dead" "$T/ha.out" || fail "ha status: $(cat "$T/ha.out")"
  grep -q "waits: no spares configured" "$T/ha.out" || fail "ha status: $(cat "$T/ha.out")"
  [ "$(vol_status $VOL | json_top_field state)" = degraded ] || fail "not degraded: $(vol_status $VOL)"

  say "3. a spare added by reload"
  sed -i 's/^device_id = 0$/device_id = 0\nspares = [ "127.0.0.4:7450" ]/' "$T/ublkd.conf"
  "$UBLKCTL" --socket "$SOCK" reload > "$T/reload.out" 2>&1 || fail "reload: $(cat "$T/reload.out")"
  grep -q "spares are now \[127.0.0.4:7450\]" "$T/reload.out" || fail "reload: $(cat "$T/reload.out")"
  has_new() { vol_status $VOL | json_replicas | grep -q 'rv-b@127.0.0.4:7450'; }
  wait_for 30 has_new || fail "no replacement after the reload: $(events)"

  say "4. server 3 back before the replacement is online"
  replica_server 3 "$T/srv3/replicas"
  wait_for 60 eval 'events | grep -q "caught up by a partial rebuild, rv-b@127.0.0.4:7450 dropped"' \
    || fail "the half-built replacement was not dropped: $(events); $(vol_status $VOL)"
  wait_for 120 replica_is 2 online || fail "rv-b not caught up: $(vol_status $VOL)"
  has_new && fail "the dropped replacement is still in the set: $(vol_status $VOL)"
  vol_status $VOL | grep -q '"substitutions"' && fail "the substitution was kept: $(vol_status $VOL)"

  say "5. server 3 killed again; the owner killed while the replacement is rebuilt"
  kill -KILL "$SRV_3"; wait "$SRV_3" 2>/dev/null
  wait_for 30 has_new || fail "no second replacement: $(events)"
  sleep 3
  kill -KILL "$DPID"; wait "$DPID" 2>/dev/null
  [ -b $DEV ] || fail "$DEV vanished with the owner"
  start_ublkd "$T/ublkd.conf"
  # Degraded, not live: the replacement is still being rebuilt.
  wait_for 60 eval '[ "$(vol_status $VOL | json_top_field state)" = degraded ]' \
    || fail "the restarted owner does not serve: $(vol_status $VOL)"
  vol_status $VOL | json_replicas | grep -q 'rv-b@127.0.0.3' && fail "the restart went back to the dead replica: $(vol_status $VOL)"
  new_online() { [ "$(vol_status $VOL | json_replicas | grep 'rv-b@127.0.0.4' | json_top_field state)" = online ]; }
  wait_for 400 new_online || fail "the replacement did not finish after the restart: $(vol_status $VOL)"
  fio_loop_stop
  verified_and_clean
  stop_daemon_clean
  same_replicas "$T/srv2/replicas/rv-a.img" "$T/srv4/replicas/rv-b.img"
  no_kernel_errors ublkb0
}

# A failed disk: the owner's local replica is a dm device that starts failing every I/O under
# fio verify. Its server is this node, which answers: after [ha] grace_ms the monitor replaces
# that replica alone, by a new one on the spare, and drops it once the new one is online; the
# remote replicas are left as they are. fio sees no error; verify is clean; the survivors hold
# the same data.
repl_ha_disk() {
  need_ublk
  cluster_secret
  for i in 2 3 4; do replica_server $i "$T/srv$i/replicas"; done
  run truncate -s 257M "$T/dmback.img"
  _loop=$("$LOSETUP" -f --show "$T/dmback.img") || fail "losetup failed"
  _sectors=$((257 * 1024 * 1024 / 512))
  run "$DMSETUP" create hadisk --table "0 $_sectors linear $_loop 0"
  _dm=$(dm_dev hadisk) || fail "no /dev/dm-N for hadisk"
  owner_conf "$T/ublkd.conf" 0 "$T/state" "$SOCK" \
    "{ local = \"$_dm\" }, { remote = \"127.0.0.2:7450\", id = \"rv-a\" }, { remote = \"127.0.0.3:7450\", id = \"rv-b\" }" \
    'spares = [ "127.0.0.4:7450" ]'
  cp "$T/ublkd.conf" "$T/last.conf"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV 60
  wait_live $VOL
  fio_bg disk 128M
  sleep 3
  say "the local replica's disk fails"
  run "$DMSETUP" suspend hadisk
  run "$DMSETUP" load hadisk --table "0 $_sectors error"
  run "$DMSETUP" resume hadisk
  expect_replica 0 faulted
  vol_status $VOL | json_replicas | grep "\"index\":0" | grep -q '"kind":"io_error"' \
    || fail "the local replica is not faulted for an I/O error: $(vol_status $VOL)"
  has_new() { vol_status $VOL | json_replicas | grep -q 'rv-0@127.0.0.4:7450'; }
  wait_for 60 has_new || fail "the failed replica was not replaced: $(vol_status $VOL); $("$UBLKCTL" --socket "$SOCK" events)"
  new_online() { [ "$(vol_status $VOL | json_replicas | grep 'rv-0@127.0.0.4' | json_top_field state)" = online ]; }
  wait_for 300 new_online || fail "the replacement is not online: $(vol_status $VOL)"
  wait_for 20 eval '! vol_status $VOL | json_replicas | grep -q "\"path\":\"$_dm\""' \
    || fail "the failed replica is still in the set: $(vol_status $VOL)"
  "$UBLKCTL" --socket "$SOCK" events > "$T/events.out"; cat "$T/events.out"
  grep -q "$_dm: replaced by rv-0@127.0.0.4:7450 on 127.0.0.4:7450 because its storage failed" "$T/events.out" \
    || fail "no disk-failure replacement event"
  grep -q "declared dead" "$T/events.out" && fail "a server was declared dead: $(cat "$T/events.out")"
  _subs=$(vol_status $VOL | sed 's/.*"substitutions":\[//' | grep -o '"configured"' | wc -l)
  [ "$_subs" = 1 ] || fail "$_subs replicas were substituted, expected the failed one alone: $(vol_status $VOL)"
  wait "$FIO_PID" || fail "fio failed: $(tail -n 20 "$T/disk.fio.log")"
  fio_ok "$T/disk.fio.log"
  "$UBLKCTL" --socket "$SOCK" verify $VOL > "$T/verify.out" 2>&1 || fail "verify: $(cat "$T/verify.out")"
  grep -q "replicas identical" "$T/verify.out" || fail "verify: $(cat "$T/verify.out")"
  stop_daemon_clean
  for _i in "$T/srv3/replicas/rv-b.img" "$T/srv4/replicas/rv-0.img"; do
    cmp -s -n $((256 << 20)) "$T/srv2/replicas/rv-a.img" "$_i" || fail "$_i differs from rv-a"
  done
  run "$DMSETUP" remove hadisk
  "$LOSETUP" -d "$_loop"
}

# The owner itself is killed (-9) under fio: /dev/ublkb0 stays (QUIESCED), a new owner takes it
# back by ublk user recovery with a higher generation, the re-issued I/O goes to all replicas,
# fio sees no error, and the replicas end identical.
repl_owner_kill9() {
  setup
  _g1=$(vol_status $VOL | json_top_field generation)
  fio_bg owner
  sleep 4
  say "SIGKILL the owner (pid $DPID)"
  kill -KILL "$DPID"; wait "$DPID" 2>/dev/null
  [ -b $DEV ] || fail "$DEV vanished with the owner"
  start_ublkd "$T/ublkd.conf"
  wait "$FIO_PID" || fail "fio failed across the owner crash: $(tail -n 20 "$T/owner.fio.log")"
  cat "$T/owner.fio.log"
  fio_ok "$T/owner.fio.log"
  wait_live $VOL
  _g2=$(vol_status $VOL | json_top_field generation)
  [ "$_g2" -gt "$_g1" ] || fail "generation did not go up: $_g1 -> $_g2"
  for i in 0 1 2; do expect_replica $i online; done
  stop_daemon_clean
  same_replicas "$T/srv2/replicas/rv-a.img" "$T/srv3/replicas/rv-b.img"
  no_kernel_errors ublkb0
}

# Two owners of one volume: the second activates with a higher generation; the first is fenced
# on its next I/O, fails it, removes its device and says why. The second serves the data.
repl_fence() {
  need_ublk
  cluster_secret
  replica_server 2 "$T/srv2/replicas"
  replica_server 3 "$T/srv3/replicas"
  _reps='{ remote = "127.0.0.2:7450", id = "fv-a" }, { remote = "127.0.0.3:7450", id = "fv-b" }'
  owner_conf "$T/a.conf" 0 "$T/state-a" "$SOCK" "$_reps"
  cp "$T/a.conf" "$T/last.conf"
  start_ublkd "$T/a.conf"
  _apid=$DPID
  wait_dev /dev/ublkb0 60
  run dd if=/dev/urandom of="$T/pat" bs=1M count=4
  run dd if="$T/pat" of=/dev/ublkb0 bs=1M oflag=direct conv=fsync

  start_second_owner "$_reps"
  wait_dev /dev/ublkb1 60
  _gb=$(timeout 10 "$UBLKCTL" --socket "$T/b.sock" status $VOL --output json | tr -d ' \n' | json_top_field generation)
  say "second owner serves /dev/ublkb1 at generation $_gb"

  # The first owner's next write is refused by the replicas. (Its idle ping may have been
  # fenced first and the device be gone already: then dd made a plain file, removed here.)
  if [ -b /dev/ublkb0 ] && dd if=/dev/zero of=/dev/ublkb0 bs=4k count=1 seek=100 oflag=direct conv=fsync 2>"$T/dd.err"; then
    [ -b /dev/ublkb0 ] && fail "a fenced owner's write succeeded"
  fi
  [ -b /dev/ublkb0 ] || rm -f /dev/ublkb0
  wait_for 10 vol_fenced || fail "first owner not fenced: $(vol_status $VOL)"
  vol_status $VOL | grep -q "anewerownertookover" || fail "fence reason missing: $(vol_status $VOL)"
  wait_for 20 sh -c '! [ -b /dev/ublkb0 ]' || fail "fenced device still present"
  # Nothing of the fenced write landed; the second owner reads the first owner's data.
  run dd if=/dev/ublkb1 of="$T/rb" bs=1M count=4 iflag=direct
  same_file "$T/pat" "$T/rb" "data seen by the new owner"
  run dd if=/dev/ublkb1 of="$T/blk" bs=4k skip=100 count=1 iflag=direct
  [ "$(od -An -tx1 "$T/blk" | tr -d ' \n' | tr -d 0)" != "" ] || fail "the fenced write of zeroes landed"
  kill -INT "$BPID"; wait_pid "$BPID" 30 || fail "second owner did not stop cleanly"
  kill -INT "$_apid"; wait_pid "$_apid" 30
}

# A killed owner whose volume another owner took over must not recover its old device: the
# kernel would re-issue its stale writes onto the newer owner's data. It is fenced instead:
# the QUIESCED device is removed, and the newer owner's data stays intact.
repl_stale_recover() {
  need_ublk
  cluster_secret
  replica_server 2 "$T/srv2/replicas"
  replica_server 3 "$T/srv3/replicas"
  _reps='{ remote = "127.0.0.2:7450", id = "sv-a" }, { remote = "127.0.0.3:7450", id = "sv-b" }'
  owner_conf "$T/a.conf" 0 "$T/state-a" "$SOCK" "$_reps"
  start_ublkd "$T/a.conf"
  wait_dev /dev/ublkb0 60
  run dd if=/dev/urandom of="$T/p1" bs=1M count=2
  run dd if="$T/p1" of=/dev/ublkb0 bs=1M oflag=direct conv=fsync
  say "SIGKILL owner A (pid $DPID): /dev/ublkb0 stays, QUIESCED"
  kill -KILL "$DPID"; wait "$DPID" 2>/dev/null
  [ -b /dev/ublkb0 ] || fail "/dev/ublkb0 vanished with its owner"

  start_second_owner "$_reps"
  wait_dev /dev/ublkb1 60
  run dd if=/dev/urandom of="$T/p2" bs=1M count=2
  run dd if="$T/p2" of=/dev/ublkb1 bs=1M oflag=direct conv=fsync

  say "restart owner A: it must not take /dev/ublkb0 back"
  start_ublkd "$T/a.conf"
  wait_for 30 vol_fenced || fail "owner A not fenced: $(vol_status $VOL)"
  vol_status $VOL | grep -q "notrecoveringit" || fail "reason missing: $(vol_status $VOL)"
  wait_for 20 sh -c '! [ -e /sys/class/ublk-char/ublkc0 ]' || fail "stale device ublkc0 still present"
  # Owner B still serves, and its data is what is on the replicas.
  run dd if=/dev/ublkb1 of="$T/rb" bs=1M count=2 iflag=direct
  same_file "$T/p2" "$T/rb" "newer owner's data"
  kill -INT "$BPID"; wait_pid "$BPID" 30 || fail "owner B did not stop cleanly"
  stop_daemon_clean
}

# A replica server dies under fio (the survivors record the fault in their labels), the
# owner stops and loses its whole state dir, the server comes back: the fresh owner must
# not trust that replica — its label is behind the survivors' membership — until a full
# rebuild has filled it. The earlier data verifies; then all three replicas are identical.
repl_lost_state_dir() {
  setup
  fio_bg lost 48M
  sleep 4
  say "SIGKILL replica server 3 (pid $SRV_3)"
  kill -KILL "$SRV_3"; wait "$SRV_3" 2>/dev/null
  wait "$FIO_PID" || fail "fio failed: $(tail -n 20 "$T/lost.fio.log")"
  fio_ok "$T/lost.fio.log"
  expect_replica 2 faulted
  stop_daemon_clean
  say "rm -rf the owner's state dir; restart server 3"
  rm -rf "$T/state"
  replica_server 3 "$T/srv3/replicas"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV 60
  expect_replica 0 online
  expect_replica 1 online
  # Not trusted: faulted as stale, then filled by a full rebuild (what it missed went with
  # the state dir).
  grep -q "not trusted at start.*stale: its label" "$T/ublkd.log" \
    || fail "replica 2 not faulted as stale: $(grep 'not trusted' "$T/ublkd.log")"
  # What fio wrote before reads back (the same job, verifying only).
  "$FIO" --name=lost --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
    --direct=1 --size=48M --verify=crc32c --verify_only --verify_fatal=1 --output="$T/reread.fio.log" \
    || fail "verify after the new start failed: $(tail -n 20 "$T/reread.fio.log")"
  fio_ok "$T/reread.fio.log"
  run dd if=/dev/urandom of=$DEV bs=1M count=8 seek=120 oflag=direct conv=fsync
  wait_for 120 replica_is 2 online || fail "replica 2 not rebuilt: $(vol_status $VOL)"
  stop_daemon_clean
  same_replicas "$T/srv2/replicas/rv-a.img" "$T/srv3/replicas/rv-b.img"
  no_kernel_errors ublkb0
}

# Several fio jobs write (and trim) the same 1 MiB concurrently, with overlapping ranges
# of 4-64 KiB: every replica must end up byte-identical (overlapping mutations reach every
# replica in the same order). The replicas sit on virtio disks (the local one raw, the
# servers' on ext4, all O_DIRECT), where the device may run two queued writes in either
# order: without the range table this scenario fails (measured with the bench-unordered
# build).
repl_overlap() {
  need_ublk
  set -- $VM_DISKS
  [ $# -ge 3 ] || fail "need 3 virtio disks, have: $VM_DISKS"
  _local=$1
  for d in "$2" "$3"; do run "$MKFS_EXT4" -q -F "$d"; done
  mkdir -p /mnt/o2 /mnt/o3
  run "$MOUNT" "$2" /mnt/o2
  run "$MOUNT" "$3" /mnt/o3
  cluster_secret
  replica_server 2 /mnt/o2
  replica_server 3 /mnt/o3
  owner_conf "$T/ublkd.conf" 0 "$T/state" "$SOCK" \
    "{ local = \"$_local\" }, { remote = \"127.0.0.2:7450\", id = \"ov-a\" }, { remote = \"127.0.0.3:7450\", id = \"ov-b\" }"
  cp "$T/ublkd.conf" "$T/last.conf"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV 60
  wait_live $VOL
  grep -q "DISCARD is not advertised" "$T/ublkd.log" && fail "discard not advertised on file and disk replicas"
  "$FIO" --filename=$DEV --direct=1 --size=1M --time_based --runtime=8 --group_reporting \
    --name=w --ioengine=io_uring --rw=randwrite --bsrange=4k-64k --numjobs=4 --iodepth=16 \
    --name=t --ioengine=psync --rw=randtrim --bs=16k --numjobs=1 \
    --output="$T/overlap.fio.log" || fail "fio failed: $(tail -n 20 "$T/overlap.fio.log")"
  cat "$T/overlap.fio.log"
  fio_ok "$T/overlap.fio.log"
  _st=$(vol_status $VOL)
  _w=$(echo "$_st" | sed -n 's/.*"writes":\([0-9]*\).*/\1/p')
  _d=$(echo "$_st" | sed -n 's/.*"discards":\([0-9]*\).*/\1/p')
  say "writes $_w discards $_d"
  [ "${_d:-0}" -gt 0 ] || fail "no discard reached the volume"
  for i in 0 1 2; do expect_replica $i online; done
  stop_daemon_clean
  for _i in /mnt/o2/ov-a.img /mnt/o3/ov-b.img; do
    cmp -s -n $((256 << 20)) "$_local" "$_i" || fail "replica $_i differs from the local replica"
  done
  say "replicas identical: $_local /mnt/o2/ov-a.img /mnt/o3/ov-b.img"
  no_kernel_errors ublkb0
}
