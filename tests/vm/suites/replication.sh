# timeout: 1500
#
# Remote replicas on the real ublk driver. Three ublkd processes in one guest, each with its
# own config and state dir: the owner serves /dev/ublkb0 from 1 local + 2 remote replicas; two
# replica servers listen on 127.0.0.2:7450 and 127.0.0.3:7450 (real TCP over loopback, shared
# cluster secret). Every scenario checks data (fio verify=crc32c, checksums, e2fsck) and, after
# a clean stop of the owner, that every surviving replica is byte-identical to the local one.

SCENARIOS="repl_fio_sigkill repl_fio_sigstop repl_ext4_kill repl_restart repl_fence"
timeout_repl_fio_sigkill=300
timeout_repl_fio_sigstop=300
timeout_repl_ext4_kill=300
timeout_repl_restart=300
timeout_repl_fence=240

DEV=/dev/ublkb0
VOL=rv
IO_TIMEOUT_MS=1500

# secret: one cluster secret for the three daemons (mode 0600, as ublkd demands).
secret() {
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$T/cluster.key"
  chmod 600 "$T/cluster.key"
}

# start_server N: a replica server on 127.0.0.N:7450 (dir $T/srvN, log $T/srvN.log); sets SPID_N.
server_listening() { grep -q "replica server listening" "$T/srv$1.log" 2>/dev/null; }
start_server() {
  _d="$T/srv$1"
  mkdir -p "$_d"
  cat > "$_d/ublk.toml" <<EOF
[node]
state_dir = "$_d/state"
control_socket = "$_d/ctl.sock"
cluster_secret_file = "$T/cluster.key"

[server]
listen = "127.0.0.$1:7450"
storage_dir = "$_d/replicas"
EOF
  "$UBLKD" --config "$_d/ublk.toml" >> "$T/srv$1.log" 2>&1 &
  eval "SPID_$1=$!"
  wait_for 20 server_listening "$1" || fail "replica server $1 did not start: $(tail -n 5 "$T/srv$1.log")"
  say "replica server 127.0.0.$1:7450 pid $(eval echo \$SPID_$1)"
}

# owner_conf FILE DEVICE_ID STATE_DIR SOCKET REPLICAS: an owner config for volume $VOL.
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
replicas = [ $5 ]
EOF
  say "config $1:"; sed 's/^/    /' "$1"
}

# setup: secret, two servers, the owner serving $DEV from 1 local + 2 remote replicas.
setup() {
  need_ublk
  secret
  start_server 2
  start_server 3
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

# same_replicas IMG...: after a clean owner stop, every given image equals the local one.
same_replicas() {
  for _i in "$@"; do
    cmp "$T/local.img" "$_i" || fail "replica $_i differs from the local replica"
  done
  say "replicas identical: local.img $*"
}

# fio_bg NAME: 4k randwrite QD32 with crc32c verify over 96 MiB of $DEV, in the background.
fio_bg() {
  "$FIO" --name="$1" --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
    --direct=1 --size=96M --verify=crc32c --do_verify=1 --verify_fatal=1 \
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
  say "SIGKILL replica server 3 (pid $SPID_3)"
  kill -KILL "$SPID_3"
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

# A replica server is SIGSTOPped (hangs without closing its socket): after the deadline it is
# faulted and I/O carries on, no error to fio.
repl_fio_sigstop() {
  setup
  fio_bg stop
  sleep 4
  say "SIGSTOP replica server 2 (pid $SPID_2)"
  kill -STOP "$SPID_2"
  wait "$FIO_PID"; _rc=$?
  kill -CONT "$SPID_2"
  [ $_rc -eq 0 ] || fail "fio failed: $(tail -n 20 "$T/stop.fio.log")"
  cat "$T/stop.fio.log"
  fio_ok "$T/stop.fio.log"
  expect_replica 1 faulted
  # (vol_status strips whitespace from the JSON)
  vol_status $VOL | grep -q "missedtheI/Odeadline" || fail "fault reason is not the deadline: $(vol_status $VOL)"
  expect_replica 2 online
  stop_daemon_clean
  same_replicas "$T/srv3/replicas/rv-b.img"
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
  say "SIGKILL replica server 2 (pid $SPID_2)"
  kill -KILL "$SPID_2"
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
# data. A killed server that comes back is reconnected but stays faulted (it missed writes).
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
  kill -KILL "$SPID_3"; wait "$SPID_3" 2>/dev/null
  run dd if=/dev/urandom of=$DEV bs=1M seek=32 count=4 oflag=direct conv=fsync
  expect_replica 2 faulted
  start_server 3
  wait_for 20 grep -q "replica reachable again" "$T/ublkd.log" \
    || fail "owner did not reconnect to the restarted server"
  run dd if=/dev/urandom of=$DEV bs=1M seek=40 count=4 oflag=direct conv=fsync
  expect_replica 2 faulted
  stop_daemon_clean
  same_replicas "$T/srv2/replicas/rv-a.img"
  no_kernel_errors ublkb0
}

# Two owners of one volume: the second activates with a higher generation; the first is fenced
# on its next I/O, fails it, removes its device and says why. The second serves the data.
repl_fence() {
  need_ublk
  secret
  start_server 2
  start_server 3
  _reps='{ remote = "127.0.0.2:7450", id = "fv-a" }, { remote = "127.0.0.3:7450", id = "fv-b" }'
  owner_conf "$T/a.conf" 0 "$T/state-a" "$SOCK" "$_reps"
  cp "$T/a.conf" "$T/last.conf"
  start_ublkd "$T/a.conf"
  _apid=$DPID
  wait_dev /dev/ublkb0 60
  run dd if=/dev/urandom of="$T/pat" bs=1M count=4
  run dd if="$T/pat" of=/dev/ublkb0 bs=1M oflag=direct conv=fsync

  owner_conf "$T/b.conf" 1 "$T/state-b" "$T/b.sock" "$_reps"
  "$UBLKD" --config "$T/b.conf" >> "$T/ublkd-b.log" 2>&1 &
  _bpid=$!
  wait_dev /dev/ublkb1 60
  _gb=$(timeout 10 "$UBLKCTL" --socket "$T/b.sock" status $VOL --output json | tr -d ' \n' | json_top_field generation)
  say "second owner serves /dev/ublkb1 at generation $_gb"

  # The first owner's next write is refused by the replicas.
  if dd if=/dev/zero of=/dev/ublkb0 bs=4k count=1 seek=100 oflag=direct conv=fsync 2>"$T/dd.err"; then
    fail "a fenced owner's write succeeded"
  fi
  _fenced() { [ "$(vol_status $VOL | json_top_field state)" = fenced ]; }
  wait_for 10 _fenced || fail "first owner not fenced: $(vol_status $VOL)"
  vol_status $VOL | grep -q "anewerownertookover" || fail "fence reason missing: $(vol_status $VOL)"
  wait_for 20 sh -c '! [ -b /dev/ublkb0 ]' || fail "fenced device still present"
  # Nothing of the fenced write landed; the second owner reads the first owner's data.
  run dd if=/dev/ublkb1 of="$T/rb" bs=1M count=4 iflag=direct
  same_file "$T/pat" "$T/rb" "data seen by the new owner"
  run dd if=/dev/ublkb1 of="$T/blk" bs=4k skip=100 count=1 iflag=direct
  [ "$(od -An -tx1 "$T/blk" | tr -d ' \n' | tr -d 0)" != "" ] || fail "the fenced write of zeroes landed"
  kill -TERM "$_bpid"; wait_pid "$_bpid" 30 || fail "second owner did not stop cleanly"
  kill -TERM "$_apid"; wait_pid "$_apid" 30
}
