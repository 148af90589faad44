# timeout: 1700
#
# End-to-end tests of ublkd on the real ublk driver. Every scenario asserts on data (checksums),
# exit codes and kernel logs; none passes if the driver or the binaries are missing (need_ublk).
# Helpers (run, fail, mkconf, start_ublkd, ...) are in tests/vm/lib.sh. Each scenario runs in
# its own scratch dir $T (tmpfs) and leaves no daemon, mount or device behind on success.

SCENARIOS="bad_config dd_pattern ext4_fsck fio_verify snapshot_ext4 metrics_under_fio sigint_clean sigterm_hand_over kill9_recover mirror_fault source_error_writes lost_state_dir ops_guards unclean_restart two_volumes"
timeout_bad_config=120
timeout_dd_pattern=120
timeout_ext4_fsck=240
timeout_fio_verify=300
timeout_snapshot_ext4=300
timeout_sigint_clean=120
timeout_sigterm_hand_over=360
timeout_kill9_recover=360
timeout_mirror_fault=420
timeout_source_error_writes=400
timeout_lost_state_dir=300
timeout_ops_guards=300
timeout_unclean_restart=200
timeout_two_volumes=200

DEV=/dev/ublkb0

# ---------------------------------------------------------------------------------------------
# A bad config is refused by both `check-config` and `--config`, naming the key and its line.
bad_config() {
  need_ublk
  mkconf "$T/good.conf" vol0 64MiB "$T/r0.img"
  # Baseline: a good config passes, so the failures below are about the bad lines.
  "$UBLKD" check-config "$T/good.conf" > "$T/good.out" 2>&1
  rc=$?; cat "$T/good.out"
  [ $rc -eq 0 ] || fail "check-config rejects a good config (exit $rc): $(head -c 300 "$T/good.out")"

  # case: key, sed script turning the good config into a bad one.
  n=0
  for case in \
    'bogus_key|/^log_level/a bogus_key = 1' \
    'colour|/^device_id/a colour = "red"' \
    'block_size|s/^block_size = .*/block_size = 1000/' \
    'size|s/^size = .*/size = "12XB"/' ; do
    n=$((n + 1))
    key=${case%%|*}; script=${case#*|}
    f="$T/bad$n.conf"
    sed "$script" "$T/good.conf" > "$f"
    line=$(grep -n "^$key = " "$f" | head -n1 | cut -d: -f1)
    [ -n "$line" ] && ! cmp -s "$f" "$T/good.conf" || fail "test bug: could not build bad config for $key"
    say "bad config $n: '$(sed -n "${line}p" "$f")' at line $line"

    timeout 20 "$UBLKD" check-config "$f" > "$T/check$n.out" 2> "$T/check$n.err"
    rc=$?; sed 's/^/    check-config: /' "$T/check$n.err"
    [ $rc -ne 0 ] || fail "check-config accepted bad $key"
    [ $rc -ne 124 ] && [ $rc -ne 143 ] || fail "check-config hung on bad $key"
    grep -q "$key" "$T/check$n.err" || fail "check-config stderr does not name '$key': $(head -c 200 "$T/check$n.err")"
    grep -Eq "line:? *$line([^0-9]|$)|:$line(:|[^0-9]|$)" "$T/check$n.err" \
      || fail "check-config stderr does not give line $line for '$key': $(head -c 200 "$T/check$n.err")"

    timeout 20 "$UBLKD" --config "$f" > "$T/run$n.out" 2> "$T/run$n.err"
    rc=$?; sed 's/^/    ublkd --config: /' "$T/run$n.err" | tail -n 5
    [ $rc -ne 124 ] && [ $rc -ne 143 ] || fail "ublkd --config kept running with bad $key"
    [ $rc -ne 0 ] || fail "ublkd --config exited 0 with bad $key"
    grep -q "$key" "$T/run$n.err" || fail "ublkd --config stderr does not name '$key'"
    ! ls /dev/ublkb* >/dev/null 2>&1 || fail "ublkd created a device from a bad config ($key)"
  done
}

# ---------------------------------------------------------------------------------------------
# Direct-I/O patterns at several offsets read back identical, land in the replica file at the
# same offset, and never-written space reads as zeros.
dd_pattern() {
  need_ublk
  mkconf "$T/ublkd.conf" vol0 64MiB "$T/r0.img"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  size=$("$BLOCKDEV" --getsize64 $DEV)
  [ "$size" = 67108864 ] || fail "$DEV is $size bytes, expected 64MiB"
  lbs=$("$BLOCKDEV" --getss $DEV)
  [ "$lbs" = 4096 ] || fail "$DEV logical block size $lbs, expected 4096"

  run dd if=/dev/urandom of="$T/pat" bs=1M count=1
  run dd if=/dev/zero of="$T/zero" bs=1M count=1
  # MiB offsets: first, unaligned-ish middle ones, last.
  for off in 0 7 33 63; do
    run dd if="$T/pat" of=$DEV bs=1M seek=$off oflag=direct conv=fsync
  done
  # Small writes at a 4 KiB (not MiB) aligned offset, crossing no MiB boundary.
  run dd if=/dev/urandom of="$T/small" bs=4096 count=3
  run dd if="$T/small" of=$DEV bs=4096 seek=12345 oflag=direct conv=fsync

  for off in 0 7 33 63; do
    run dd if=$DEV of="$T/rb" bs=1M skip=$off count=1 iflag=direct
    same_file "$T/pat" "$T/rb" "read back at ${off}MiB"
    # The replica is a plain image: same bytes at the same offset.
    run dd if="$T/r0.img" of="$T/rr" bs=1M skip=$off count=1
    same_file "$T/pat" "$T/rr" "replica file at ${off}MiB"
  done
  run dd if=$DEV of="$T/rb" bs=4096 skip=12345 count=3 iflag=direct
  same_file "$T/small" "$T/rb" "4k writes at block 12345"
  run dd if=$DEV of="$T/rb" bs=1M skip=20 count=1 iflag=direct
  same_file "$T/zero" "$T/rb" "never-written MiB 20"

  stop_daemon_clean
  no_kernel_errors ublkb0
}

# ext4_on_fresh_volume: a one-replica 256 MiB volume with ext4 mounted on $M.
# ext4_on_fresh_volume [IMG...]: vol0 (256 MiB) on these replicas ($T/r0.img), ext4 on it
# mounted on $M.
ext4_on_fresh_volume() {
  [ $# -gt 0 ] || set -- "$T/r0.img"
  mkconf "$T/ublkd.conf" vol0 256MiB "$@"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  M=/mnt/$SCENARIO; mkdir -p $M
  run "$MKFS_EXT4" -F -q $DEV
  run "$MOUNT" -t ext4 $DEV $M
}

# ---------------------------------------------------------------------------------------------
# ext4: files survive umount/remount with the page cache dropped; fsck finds nothing.
ext4_fsck() {
  need_ublk
  ext4_on_fresh_volume
  mkdir -p $M/d0 $M/d1 $M/d2 $M/d3/deep/er
  i=0
  while [ $i -lt 24 ]; do
    run dd if=/dev/urandom of=$M/d$((i % 4))/f$i bs=4k count=$(( (i * 37 % 97) + 1 ))
    i=$((i + 1))
  done
  run dd if=/dev/urandom of=$M/d3/deep/er/big bs=1M count=48
  (cd $M && find . -type f | sort | xargs sha256sum) > "$T/sums"
  [ "$(wc -l < "$T/sums")" -eq 25 ] || fail "expected 25 files, have $(wc -l < "$T/sums")"
  run sync
  umount_checked $M $DEV
  drop_caches
  fsck_clean $DEV
  run "$MOUNT" -t ext4 $DEV $M
  (cd $M && sha256sum -c "$T/sums") > "$T/verify.out" 2>&1 || fail "checksums differ after remount: $(grep -v ': OK$' "$T/verify.out" | head -n 3 | tr '\n' ' ')"
  umount_checked $M $DEV
  stop_daemon_clean
  no_kernel_errors ublkb0
}

# ---------------------------------------------------------------------------------------------
# fio write+verify with deep queues (io_uring, O_DIRECT): random 4k, then large sequential I/O
# (1 MiB requests are bigger than the daemon's per-request buffer and get split by the kernel).
fio_verify() {
  need_ublk
  mkconf "$T/ublkd.conf" vol0 256MiB "$T/r0.img"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  run "$FIO" --name=randwrite --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 \
      --ioengine=io_uring --direct=1 --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --output="$T/randwrite.fio.log"
  cat "$T/randwrite.fio.log"
  fio_ok "$T/randwrite.fio.log"
  run "$FIO" --name=seqwrite --filename=$DEV --rw=write --bs=1M --iodepth=4 --offset=128M \
      --ioengine=io_uring --direct=1 --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --output="$T/seqwrite.fio.log"
  fio_ok "$T/seqwrite.fio.log"
  stop_daemon_clean
  no_kernel_errors ublkb0
}

# ---------------------------------------------------------------------------------------------
# Snapshots through the real device, two replicas: ext4 mounted, a writer running, `snapshot
# create --freeze` (FIFREEZE around the barrier); more files after it; the snapshot is on both
# replicas; exported raw and qcow2 while the volume runs (qemu-img checks and compares them; the
# raw one fscks clean and mounts read-only with the files from before the snapshot, none after);
# revert is refused while mounted; after umount it rolls the volume back: the files
# from before are intact, the ones after are gone, fsck is clean, and the volume still takes
# writes and verifies after.
snapshot_ext4() {
  need_ublk
  ext4_on_fresh_volume "$T/r0.img" "$T/r1.img"
  mkdir -p $M/before
  i=0
  while [ $i -lt 16 ]; do
    run dd if=/dev/urandom of=$M/before/f$i bs=4k count=$(( (i * 53 % 61) + 1 ))
    i=$((i + 1))
  done
  (cd $M && find before -type f | sort | xargs sha256sum) > "$T/before.sums"
  # A writer keeps the filesystem busy across the snapshot.
  ( j=0; while [ $j -lt 200 ]; do dd if=/dev/urandom of=$M/busy$((j % 8)) bs=64k count=2 2>/dev/null; j=$((j + 1)); done ) &
  _w=$!
  sleep 1
  "$UBLKCTL" --socket "$SOCK" snapshot create vol0 s1 --freeze > "$T/create.out" 2>&1 \
    || fail "snapshot create failed: $(cat "$T/create.out")"
  cat "$T/create.out"
  grep -q "on 2 replica" "$T/create.out" || fail "the snapshot is not on both replicas: $(cat "$T/create.out")"
  wait $_w
  # The freeze was thawed: the filesystem takes writes.
  mkdir -p $M/after
  run dd if=/dev/urandom of=$M/after/new bs=1M count=4
  run rm -f $M/before/f3
  run sync
  "$UBLKCTL" --socket "$SOCK" snapshot list vol0 --output json > "$T/list.json" 2>&1 || fail "snapshot list: $(cat "$T/list.json")"
  cat "$T/list.json"
  grep -q '"name": "s1"' "$T/list.json" || fail "s1 not listed"
  grep -q '"missing": \[\]' "$T/list.json" || fail "a replica lacks s1: $(cat "$T/list.json")"
  # Exported while the volume runs on: raw and qcow2 read back as the same disk (qemu-img),
  # and the raw one is a clean ext4 (the freeze) with the files from before, none from after.
  "$UBLKCTL" --socket "$SOCK" snapshot export vol0 s1 "$T/s1.raw" > "$T/export.out" 2>&1 \
    || fail "export (raw): $(cat "$T/export.out")"
  cat "$T/export.out"
  "$UBLKCTL" --socket "$SOCK" snapshot export vol0 s1 "$T/s1.qcow2" --format qcow2 > "$T/export2.out" 2>&1 \
    || fail "export (qcow2): $(cat "$T/export2.out")"
  cat "$T/export2.out"
  if "$UBLKCTL" --socket "$SOCK" snapshot export vol0 s1 "$T/s1.raw" > "$T/exists.out" 2>&1; then
    fail "an export replaced an existing file without --force"
  fi
  grep -q "exists" "$T/exists.out" || fail "the refusal does not say the file exists: $(cat "$T/exists.out")"
  run "$QEMU_IMG" check "$T/s1.qcow2"
  run "$QEMU_IMG" compare "$T/s1.raw" "$T/s1.qcow2"
  fsck_clean "$T/s1.raw"
  mkdir -p /mnt/s1
  run "$MOUNT" -o ro,loop "$T/s1.raw" /mnt/s1
  (cd /mnt/s1 && sha256sum -c "$T/before.sums") > "$T/s1.verify" 2>&1 \
    || fail "files of the snapshot's export differ: $(grep -v ': OK$' "$T/s1.verify" | head -n 3 | tr '\n' ' ')"
  [ ! -e /mnt/s1/after/new ] || fail "a file written after the snapshot is in its export"
  run "$UMOUNT" /mnt/s1
  rm -f "$T/s1.raw" "$T/s1.qcow2"
  # Revert needs the device unused.
  if "$UBLKCTL" --socket "$SOCK" snapshot revert vol0 s1 > "$T/busy.out" 2>&1; then
    fail "revert went through with the filesystem mounted"
  fi
  grep -q "in use" "$T/busy.out" || fail "the refusal does not say the device is in use: $(cat "$T/busy.out")"
  umount_checked $M $DEV
  "$UBLKCTL" --socket "$SOCK" snapshot revert vol0 s1 > "$T/revert.out" 2>&1 || fail "revert: $(cat "$T/revert.out")"
  cat "$T/revert.out"
  fsck_clean $DEV
  run "$MOUNT" -t ext4 $DEV $M
  (cd $M && sha256sum -c "$T/before.sums") > "$T/verify.out" 2>&1 \
    || fail "files from before the snapshot differ after the revert: $(grep -v ': OK$' "$T/verify.out" | head -n 3 | tr '\n' ' ')"
  [ ! -e $M/after/new ] || fail "a file written after the snapshot survived the revert"
  # The reverted volume takes writes, and they verify.
  umount_checked $M $DEV
  run "$FIO" --name=after --filename=$DEV --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring \
      --direct=1 --size=32M --offset=200M --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$T/after.fio"
  fio_ok "$T/after.fio"
  "$UBLKCTL" --socket "$SOCK" verify vol0 > "$T/verify2.out" 2>&1 || fail "the replicas differ after the revert: $(cat "$T/verify2.out")"
  "$UBLKCTL" --socket "$SOCK" snapshot delete vol0 s1 > "$T/delete.out" 2>&1 || fail "delete: $(cat "$T/delete.out")"
  stop_daemon_clean
  no_kernel_errors ublkb0
}

# ---------------------------------------------------------------------------------------------
# /metrics of a volume served through the real driver, scraped while fio runs QD32 on it: the
# queue depth is seen above 1, the counters and the latency histogram move by what fio did.
# scrape: GET /metrics with busybox's wget (the guest has no curl).
scrape() { busybox wget -q -O - "http://127.0.0.1:9850/metrics"; }
# metric TEXT SERIES: the value of SERIES (name{labels}) in TEXT.
metric() { printf '%s\n' "$1" | awk -v s="$2" 'index($0, s " ") == 1 { print $2 }'; }
metrics_under_fio() {
  need_ublk
  # A remote replica too: a local file on tmpfs completes inside the submission, so with
  # it alone nothing is ever in flight while the (single) vCPU runs the scrape.
  cluster_secret
  replica_server 2 "$T/srv2-replicas"
  mkconf "$T/ublkd.conf" vol0 256MiB "$T/r0.img"
  sed -i 's|^replicas = \[ \(.*\) \]$|replicas = [ \1, { remote = "127.0.0.2:7450", id = "vol0-r" } ]|' "$T/ublkd.conf"
  sed -i "s|^\[node\]$|[node]\ncluster_secret_file = \"$T/cluster.key\"|" "$T/ublkd.conf"
  printf '\n[metrics]\nlisten = "127.0.0.1:9850"\n' >> "$T/ublkd.conf"
  cp "$T/ublkd.conf" "$T/last.conf"
  cat "$T/ublkd.conf"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  _w='ublkd_volume_requests_total{volume="vol0",op="write"}'
  _c='ublkd_volume_request_duration_seconds_count{volume="vol0",op="write"}'
  _q='ublkd_volume_in_flight_requests{volume="vol0"}'
  _before=$(scrape) || fail "no answer on 127.0.0.1:9850/metrics"
  w0=$(metric "$_before" "$_w"); [ -n "$w0" ] || fail "no $_w in: $_before"
  "$FIO" --name=load --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size=64M --time_based --runtime=12 --output="$T/load.fio" &
  _fio=$!
  sleep 4
  # The queue depth under QD32, sampled a few times (a sample may fall between bursts).
  qmax=0
  for _i in 1 2 3 4 5 6; do
    q=$(metric "$(scrape)" "$_q"); q=${q%.*}
    [ "${q:-0}" -gt "$qmax" ] && qmax=$q
    sleep 0.5
  done
  wait $_fio || fail "fio failed: $(tail -n 5 "$T/load.fio")"
  fio_ok "$T/load.fio"
  _after=$(scrape)
  w1=$(metric "$_after" "$_w"); c1=$(metric "$_after" "$_c")
  ios=$(awk -F'[=,]' '/write: IOPS/ { next } /issued rwts:/ { for (i = 1; i <= NF; i++) if ($i ~ /total/) { print $(i+2); exit } }' "$T/load.fio")
  say "writes counted $w0 -> $w1 (fio issued ${ios:-?}), latency observations $c1, max in flight seen $qmax"
  [ "$((w1 - w0))" -gt 500 ] || fail "the write counter barely moved: $w0 -> $w1"
  # Bytes, not requests: the block layer may merge neighbouring writes into one request.
  _b='ublkd_volume_written_bytes_total{volume="vol0"}'
  b0=$(metric "$_before" "$_b"); b1=$(metric "$_after" "$_b")
  [ -n "$ios" ] || fail "no issued count in fio's output"
  [ "$((b1 - b0))" = "$((ios * 4096))" ] || fail "fio wrote $((ios * 4096)) bytes, the counter moved by $((b1 - b0))"
  [ "$c1" = "$w1" ] || fail "latency observations ($c1) != writes ($w1)"
  [ "$qmax" -gt 1 ] || fail "the queue depth under QD32 was never seen above 1 (max $qmax)"
  [ "$(metric "$_after" "$_q")" = 0 ] || [ "$(metric "$_after" "$_q")" = 0.0 ] || fail "requests in flight after fio ended: $(metric "$_after" "$_q")"
  [ "$(printf '%s\n' "$_after" | grep -c '^ublkd_replica_online{volume="vol0",.*} 1')" = 2 ] \
    || fail "the replicas are not shown online: $(printf '%s\n' "$_after" | grep replica_online)"
  stop_daemon_clean
  no_kernel_errors ublkb0
}

# ---------------------------------------------------------------------------------------------
# SIGINT (Ctrl-C; stop_ublkd): exit 0, no device left behind; data written before persists
# into the next run.
no_ublk_devices() { ! ls /dev/ublkb* /sys/class/ublk-char/ublkc* >/dev/null 2>&1; }
sigint_clean() {
  need_ublk
  mkconf "$T/ublkd.conf" vol0 64MiB "$T/r0.img"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  run dd if=/dev/urandom of="$T/pat" bs=1M count=4
  run dd if="$T/pat" of=$DEV bs=1M seek=8 oflag=direct conv=fsync

  stop_daemon_clean
  wait_for 10 no_ublk_devices || fail "devices left after SIGINT: $(ls /dev/ublkb* /sys/class/ublk-char/ 2>&1 | tr '\n' ' ')"
  no_ublkd || fail "a ublkd process is still running"
  [ -c /dev/ublk-control ] || fail "/dev/ublk-control vanished"

  # Second life: the data is still there, and the second SIGINT is as clean.
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  run dd if=$DEV of="$T/rb" bs=1M skip=8 count=4 iflag=direct
  same_file "$T/pat" "$T/rb" "data after restart"
  stop_daemon_clean
  wait_for 10 no_ublk_devices || fail "devices left after second SIGINT: $(ls /dev/ublkb* /sys/class/ublk-char/ 2>&1 | tr '\n' ' ')"
  no_kernel_errors ublkb0

  # Third life: SIGINT with writes in flight. The daemon drains what the kernel already
  # handed it, removes the device and exits 0; the writer then gets errors (its device is
  # gone) instead of hanging; the kernel logs no bug.
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  "$FIO" --name=busy --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size=64M --time_based --runtime=60 --output="$T/busy.fio.log" &
  FPID=$!
  sleep 2
  alive $FPID || fail "fio ended before SIGINT: $(tail -n 5 "$T/busy.fio.log")"
  stop_daemon_clean
  wait_pid $FPID 30 || say "fio exited non-zero after its device was removed (expected)"
  wait_for 10 no_ublk_devices || fail "devices left after SIGINT under load"
  bug=$(dmesg_since_start | grep -E 'BUG:|Oops|WARNING:|hung_task' | head -n 3)
  [ -z "$bug" ] || fail "kernel complained: $bug"
}

# ---------------------------------------------------------------------------------------------
# kill -9 of the daemon under a busy ext4 mount: the device stays (QUIESCED), a new daemon
# recovers it, the writer never sees an error, every file verifies, fsck is clean. Two rounds.
KILL_FILES=60
kill9_writer() {
  i=0
  while [ $i -lt $KILL_FILES ]; do
    # conv=fsync: every file forces I/O to the device, so a kill always finds some in flight.
    dd if=/dev/urandom of=$M/w$i bs=64k count=8 conv=fsync 2>> "$T/writer.err" \
      || { echo "dd of file $i failed" >> "$T/writer.err"; exit 1; }
    sha256sum $M/w$i >> "$T/writer.sums" || exit 1
    echo $i > "$T/writer.progress"
    i=$((i + 1))
  done
  exit 0
}
writer_progress() { cat "$T/writer.progress" 2>/dev/null || echo -1; }
writer_past() { [ "$(writer_progress)" -ge "$1" ]; }

kill9_recover() {
  need_ublk
  ext4_on_fresh_volume

  # The writer is a sibling of the daemon (both children of this shell), not its child.
  kill9_writer &
  WPID=$!
  for round in 1 2; do
    wait_for 120 writer_past $((round * 12)) || fail "writer made no progress before kill $round (at $(writer_progress))"
    alive $WPID || fail "writer ended early"
    say "round $round: kill -9 ublkd $DPID (writer at file $(writer_progress))"
    kill -KILL $DPID
    wait $DPID 2>/dev/null  # reap it, else it stays a zombie
    sleep 0.5
    [ -b $DEV ] || fail "$DEV disappeared after kill -9"
    [ -e /sys/class/ublk-char/ublkc0 ] || fail "ublkc0 disappeared after kill -9"
    before=$(writer_progress); sleep 2
    say "writer at $(writer_progress) 2 s after the kill (was $before): I/O should be blocked"
    alive $WPID || fail "writer ended while the daemon was dead: $(cat "$T/writer.err")"
    start_ublkd "$T/ublkd.conf"
    wait_live vol0 30
    "$UBLKCTL" --socket "$SOCK" list > "$T/list.out" 2>&1 || fail "ublkctl list failed: $(cat "$T/list.out")"
    grep -q vol0 "$T/list.out" || fail "ublkctl list does not show vol0: $(cat "$T/list.out")"
    [ -b $DEV ] || fail "$DEV missing after recovery"
  done

  writer_verified
  stop_daemon_clean
  no_kernel_errors ublkb0
}

# reboot_away_device: vol0's QUIESCED device goes, as in a reboot (removed as an orphan by a
# daemon that does not know vol0); $T/ublkd.conf is the cleanup's config again.
reboot_away_device() {
  STATE_DIR=/var/lib/ublkd/$SCENARIO-other DEVICE_ID=1 mkconf "$T/other.conf" other 16MiB "$T/o.img"
  start_ublkd "$T/other.conf"
  wait_dev /dev/ublkb1
  run "$UBLKCTL" --socket "$SOCK" orphans --remove
  wait_for 10 eval '! [ -e /sys/class/ublk-char/ublkc0 ]' || fail "could not remove vol0's device"
  stop_daemon_clean
  cp "$T/ublkd.conf" "$T/last.conf"
}

# writer_verified: the writer ($WPID) ends without an error having written every file; the
# filesystem unmounts, fscks clean, and every file reads back (page cache dropped).
writer_verified() {
  wait_pid $WPID 240
  rc=$?
  [ $rc -eq 0 ] || fail "writer exited $rc: $(tail -n 3 "$T/writer.err" | tr '\n' ' ')"
  [ "$(wc -l < "$T/writer.sums")" -eq $KILL_FILES ] || fail "writer wrote $(wc -l < "$T/writer.sums") of $KILL_FILES files"
  run sync
  umount_checked $M $DEV
  drop_caches
  fsck_clean $DEV
  run "$MOUNT" -t ext4 $DEV $M
  sha256sum -c "$T/writer.sums" > "$T/verify.out" 2>&1 || fail "files differ after recovery: $(grep -v ': OK$' "$T/verify.out" | head -n 3 | tr '\n' ' ')"
  umount_checked $M $DEV
}

# ---------------------------------------------------------------------------------------------
# systemctl restart as systemd does it: SIGTERM, then a new ublkd. The first hands the device
# over (stops taking requests, drains, flushes, records the volume clean, exits 0 without
# removing the device); the second takes it back. ext4 stays mounted, the writer never sees
# an error, every file verifies, fsck is clean. Two rounds. Then a hand-over whose device
# goes before the next start (a reboot): the record says clean, so that start resyncs
# nothing (after a crash it would: unclean_restart); the two replicas are identical.
sigterm_hand_over() {
  need_ublk
  ext4_on_fresh_volume "$T/r0.img" "$T/r1.img"
  kill9_writer &
  WPID=$!
  for round in 1 2; do
    wait_for 120 writer_past $((round * 12)) || fail "writer made no progress before SIGTERM $round (at $(writer_progress))"
    _from=$(($(wc -l < "$T/ublkd.log") + 1))
    say "round $round: SIGTERM ublkd $DPID (writer at file $(writer_progress))"
    _t0=$(now)
    kill -TERM $DPID
    wait_pid $DPID 60
    rc=$?
    [ $rc -eq 0 ] || fail "ublkd exited $rc on SIGTERM (expected 0 after a hand-over)"
    tail -n +$_from "$T/ublkd.log" | grep -q "handed over: the device stays.*clean=true" \
      || fail "no clean hand-over: $(tail -n +$_from "$T/ublkd.log" | grep -i 'hand' | tail -n 3)"
    [ -b $DEV ] || fail "$DEV removed by SIGTERM"
    grep -q " $M " /proc/mounts || fail "$M unmounted by SIGTERM"
    alive $WPID || fail "writer ended while no daemon ran: $(cat "$T/writer.err")"
    _from=$(($(wc -l < "$T/ublkd.log") + 1))
    start_ublkd "$T/ublkd.conf"
    wait_live vol0 30
    say "round $round: the next ublkd serves again $(awk -v a="$_t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s after SIGTERM"
    tail -n +$_from "$T/ublkd.log" | grep -q "found QUIESCED device: recovering it" \
      || fail "the device was not taken back: $(tail -n +$_from "$T/ublkd.log" | tail -n 5)"
  done
  writer_verified

  say "hand-over, then the device goes as in a reboot"
  kill -TERM $DPID
  wait_pid $DPID 60 || fail "ublkd did not exit 0 on SIGTERM"
  reboot_away_device
  _from=$(($(wc -l < "$T/ublkd.log") + 1))
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  wait_live vol0 30
  ! tail -n +$_from "$T/ublkd.log" | grep -q "unclean shutdown" || fail "a resync after a clean hand-over"
  stop_daemon_clean
  cmp -s -n $((256 << 20)) "$T/r0.img" "$T/r1.img" || fail "the replicas differ"
  no_kernel_errors ublkb0
}

# ---------------------------------------------------------------------------------------------
# Two replicas (tmpfs file + dm device); the dm device starts failing every I/O mid-fio. fio
# sees no error and verifies; status shows replica 1 faulted, replica 0 online, volume degraded.
# (The device is 1 MiB larger than the volume: a replica keeps its label after the data.)
# dm_replica: a 257 MiB dm-linear device over a loop file (dm, loopdev, sectors); dm_fail /
# dm_heal switch it to the error target and back.
dm_replica() {
  run truncate -s 257M "$T/r1back.img"
  loopdev=$("$LOSETUP" -f --show "$T/r1back.img") || fail "losetup failed"
  sectors=$((257 * 1024 * 1024 / 512))
  run "$DMSETUP" create r1 --table "0 $sectors linear $loopdev 0"
  dm=$(dm_dev r1) || fail "no /dev/dm-N for r1"
  say "replica 1 is $dm (linear over $loopdev)"
}
dm_table() {
  run "$DMSETUP" suspend r1
  run "$DMSETUP" load r1 --table "0 $sectors $1"
  run "$DMSETUP" resume r1
}
dm_fail() { dm_table error; }
dm_heal() { dm_table "linear $loopdev 0"; }

mirror_fault() {
  need_ublk
  dm_replica
  mkconf "$T/ublkd.conf" vol0 256MiB "$T/r0.img" "$dm"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  wait_live vol0 20
  st=$(vol_status vol0)
  [ "$(replica_state "$st" 0)" = online ] && [ "$(replica_state "$st" 1)" = online ] \
    || fail "replicas not both online before the fault: $st"

  "$FIO" --name=mirror --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size=192M --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --output="$T/mirror.fio.log" &
  FPID=$!
  sleep 3
  alive $FPID || fail "fio finished within 3 s, before the fault could be injected (make it bigger)"
  say "injecting fault: $dm -> error target"
  dm_fail
  alive $FPID || fail "fio finished while the fault was being injected (make it bigger)"
  say "fault injected while fio was running"

  wait_pid $FPID 360
  rc=$?
  cat "$T/mirror.fio.log"
  [ $rc -eq 0 ] || fail "fio exited $rc"
  fio_ok "$T/mirror.fio.log"

  st=$(vol_status vol0)
  say "status: $st"
  [ -n "$st" ] || fail "ublkctl status vol0 gave nothing: $(tail -n 3 "$T/ublkctl.err")"
  r0=$(replica_state "$st" 0); r1=$(replica_state "$st" 1); vs=$(echo "$st" | json_top_field state)
  [ "$r1" = faulted ] || fail "replica 1 ($dm) is '$r1', expected faulted"
  [ "$r0" = online ] || fail "replica 0 is '$r0', expected online"
  [ "$vs" = degraded ] || fail "volume state is '$vs', expected degraded"
  stop_daemon_clean

  # The failed disk comes back (table restored), but it missed writes: after a restart the
  # persisted fault keeps it out of the read set until a rebuild has copied the volume onto
  # it; then it is online and identical to replica 0.
  dm_heal
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  st=$(vol_status vol0)
  [ "$(replica_state "$st" 1)" != online ] || fail "replica 1 trusted again after restart: $st"
  run dd if=/dev/urandom of="$T/pat" bs=1M count=8
  run dd if="$T/pat" of=$DEV bs=1M seek=100 oflag=direct conv=fsync
  wait_for 120 vol_is_live vol0 || fail "replica 1 not rebuilt: $(vol_status vol0)"
  grep -q "rebuild done" "$T/ublkd.log" || fail "no rebuild in the log"
  run dd if=$DEV of="$T/rb" bs=1M skip=100 count=8 iflag=direct
  same_file "$T/pat" "$T/rb" "read back after restart"
  stop_daemon_clean
  cmp -s -n $((256 << 20)) "$T/r0.img" "$dm" || fail "the rebuilt replica differs from replica 0"
  no_kernel_errors ublkb0
}

# ---------------------------------------------------------------------------------------------
# A rebuild's source starts failing writes while it still reads (dm-flakey error_writes: a disk
# gone read-only or full). The local dm replica is the source of a new remote's full rebuild;
# mid-rebuild its writes start failing and fio --verify starts writing. Its first failed write
# faults it, and from then on it lacks every write: the copier must not copy from it again (it
# would put its stale blocks over newer ones on the target, which then goes online with them).
# The rebuild is uncapped: a paced one ends its stretch of copying every few MiB and picks its
# source anew, which hides a copier that keeps reading a source gone stale (the copy of up to
# 64 MiB from the old source before its next flush shows it). The rebuild finishes from the
# other remote; after a clean stop the two remotes are byte-identical.
source_error_writes() {
  need_ublk
  dm_replica
  cluster_secret
  replica_server 2 "$T/srv2"
  replica_server 3 "$T/srv3"
  _reps="{ local = \"$dm\" }, { remote = \"127.0.0.2:7450\", id = \"sw-a\" }"
  cat > "$T/ublkd.conf" <<EOF
[node]
state_dir = "$T/state"
control_socket = "$SOCK"
cluster_secret_file = "$T/cluster.key"

[rebuild]
rate = "0"
busy_percent = 100

[[volume]]
name = "vol0"
size = "256MiB"
block_size = 4096
device_id = 0
replicas = [ $_reps ]
EOF
  cp "$T/ublkd.conf" "$T/last.conf"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  wait_live vol0 30
  # Data everywhere, so what the source holds before the fault is not what fio writes after.
  run "$FIO" --name=fill --filename=$DEV --rw=write --bs=1M --iodepth=8 --ioengine=io_uring \
      --direct=1 --size=256M --output="$T/fill.fio.log"
  say "add sw-b on server 3: a full rebuild from the local replica"
  sed -i "s|^replicas = .*|replicas = [ $_reps, { remote = \"127.0.0.3:7450\", id = \"sw-b\" } ]|" "$T/ublkd.conf"
  cp "$T/ublkd.conf" "$T/last.conf"
  "$UBLKCTL" --socket "$SOCK" reload > "$T/reload.out" 2>&1 || fail "reload: $(cat "$T/reload.out")"
  cat "$T/reload.out"
  wait_for 20 eval '[ "$(replica_state "$(vol_status vol0)" 2)" = rebuilding ]' \
    || fail "sw-b is not rebuilding: $(vol_status vol0)"
  say "the rebuild source $dm fails writes from now on (reads still work)"
  dm_table "flakey $loopdev 0 0 3600 1 error_writes"
  [ "$(replica_state "$(vol_status vol0)" 2)" = rebuilding ] \
    || fail "the rebuild ended before the fault: $(vol_status vol0)"
  # Its first write faults the local replica, mid-rebuild.
  "$FIO" --name=sw --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size=96M --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --output="$T/sw.fio.log" &
  FPID=$!
  wait_pid $FPID 300 || fail "fio failed: $(tail -n 20 "$T/sw.fio.log")"
  fio_ok "$T/sw.fio.log"
  [ "$(replica_state "$(vol_status vol0)" 0)" = faulted ] \
    || fail "the local replica is not faulted: $(vol_status vol0)"
  wait_for 200 eval '[ "$(replica_state "$(vol_status vol0)" 2)" = online ]' \
    || fail "sw-b not rebuilt: $(vol_status vol0)"
  grep -q "rebuild source changed.*127.0.0.2:7450" "$T/ublkd.log" \
    || fail "the rebuild did not move to sw-a: $(grep -i rebuild "$T/ublkd.log" | tail -n 5)"
  "$UBLKCTL" --socket "$SOCK" verify vol0 > "$T/verify.out" 2>&1 || fail "verify: $(cat "$T/verify.out")"
  grep -q "replicas identical" "$T/verify.out" || fail "verify: $(cat "$T/verify.out")"
  "$FIO" --name=sw --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size=96M --verify=crc32c --verify_only --verify_fatal=1 \
      --output="$T/reread.fio.log" || fail "verify read failed: $(tail -n 20 "$T/reread.fio.log")"
  fio_ok "$T/reread.fio.log"
  stop_daemon_clean
  cmp -s -n $((256 << 20)) "$T/srv2/sw-a.img" "$T/srv3/sw-b.img" \
    || fail "the rebuilt replica differs from sw-a: $(cmp -n $((256 << 20)) "$T/srv2/sw-a.img" "$T/srv3/sw-b.img" 2>&1 | head -n 1)"
  say "sw-a and sw-b identical"
  no_kernel_errors ublkb0
}

# ---------------------------------------------------------------------------------------------
# The dm replica fails mid-fio and is faulted (the tmpfs replica's label records it); the
# owner's state dir is then lost and the disk comes back healthy. The fresh owner must not
# trust it — its label is behind the survivor's membership — nor write to it.
lost_state_dir() {
  need_ublk
  dm_replica
  STATE_DIR="$T/state" mkconf "$T/ublkd.conf" vol0 256MiB "$T/r0.img" "$dm"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  wait_live vol0 20
  "$FIO" --name=lsd --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size=96M --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --output="$T/lsd.fio.log" &
  FPID=$!
  sleep 3
  alive $FPID || fail "fio finished within 3 s, before the fault could be injected"
  dm_fail
  wait_pid $FPID 360 || fail "fio failed: $(tail -n 20 "$T/lsd.fio.log")"
  fio_ok "$T/lsd.fio.log"
  [ "$(replica_state "$(vol_status vol0)" 1)" = faulted ] || fail "replica 1 not faulted: $(vol_status vol0)"
  stop_daemon_clean
  dm_heal
  say "rm -rf the state dir"
  rm -rf "$T/state"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  st=$(vol_status vol0)
  [ "$(replica_state "$st" 1)" != online ] || fail "replica 1 trusted again without the state dir: $st"
  [ "$(replica_state "$st" 0)" = online ] || fail "replica 0 not online: $st"
  grep -q "not trusted at start.*stale: its label" "$T/ublkd.log" || fail "replica 1 not faulted as stale: $(grep 'not trusted' "$T/ublkd.log")"
  "$FIO" --name=lsd --filename=$DEV --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
      --direct=1 --size=96M --verify=crc32c --verify_only --verify_fatal=1 \
      --output="$T/reread.fio.log" || fail "verify after the new start failed: $(tail -n 20 "$T/reread.fio.log")"
  fio_ok "$T/reread.fio.log"
  run dd if=/dev/urandom of=$DEV bs=1M count=8 seek=100 oflag=direct conv=fsync
  # It comes back by a full rebuild (the lost state dir lost what it missed), never before.
  wait_for 120 vol_is_live vol0 || fail "replica 1 not rebuilt: $(vol_status vol0)"
  stop_daemon_clean
  cmp -s -n $((256 << 20)) "$T/r0.img" "$dm" || fail "the rebuilt replica differs from replica 0"
  no_kernel_errors ublkb0
}

# ---------------------------------------------------------------------------------------------
# Operator guards: `stop` refuses a mounted device and works after umount; `recover` brings
# the volume back with its data; a replica whose backing vanished while the daemon was down is
# faulted at start (volume degraded, still serving); a device no configured volume owns is an
# orphan: listed, and removed only when asked.
ops_guards() {
  need_ublk
  mkconf "$T/ublkd.conf" vol0 128MiB "$T/r0.img" "$T/r1.img"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  M=/mnt/$SCENARIO; mkdir -p $M
  run "$MKFS_EXT4" -F -q $DEV
  run "$MOUNT" -t ext4 $DEV $M
  run dd if=/dev/urandom of=$M/data bs=1M count=4 conv=fsync
  sum=$(sha256sum < $M/data)

  # A second daemon started on the same config (another socket) must leave the serving
  # one alone: its vol0 fails at once (device LIVE elsewhere), no replica is faulted.
  sed 's|^control_socket = .*|control_socket = "/run/ublkd/second.sock"|' "$T/ublkd.conf" > "$T/second.conf"
  "$UBLKD" --config "$T/second.conf" > "$T/second.log" 2>&1 &
  SPID=$!
  second_failed() { "$UBLKCTL" --socket /run/ublkd/second.sock status vol0 --output json 2>/dev/null | tr -d ' \n' | grep -q '"state":"failed"'; }
  wait_for 8 second_failed || fail "second daemon's vol0 did not fail fast: $(cat "$T/second.log")"
  grep -q "is LIVE, served by pid $DPID" "$T/second.log" || fail "second daemon does not say why: $(tail -n 3 "$T/second.log")"
  kill -INT $SPID; wait $SPID
  st=$(vol_status vol0)
  [ "$(replica_state "$st" 0)" = online ] && [ "$(replica_state "$st" 1)" = online ] \
    || fail "a second daemon disturbed the replicas: $st"
  ! grep -q '"faulted"' /var/lib/ublkd/$SCENARIO/volumes/vol0.json || fail "a second daemon persisted a fault"

  "$UBLKCTL" --socket "$SOCK" stop vol0 > "$T/stop.out" 2>&1 && fail "stop of a mounted volume succeeded"
  grep -q "in use" "$T/stop.out" || fail "stop refusal does not say why: $(cat "$T/stop.out")"
  [ -b $DEV ] || fail "$DEV gone after a refused stop"
  umount_checked $M $DEV
  run "$UBLKCTL" --socket "$SOCK" stop vol0
  [ "$(vol_status vol0 | json_top_field state)" = stopped ] || fail "volume not stopped: $(vol_status vol0)"
  wait_for 10 eval '! [ -e /sys/class/ublk-char/ublkc0 ]' || fail "device left after stop"
  run "$UBLKCTL" --socket "$SOCK" recover vol0
  wait_live vol0 30
  wait_dev $DEV
  run "$MOUNT" -t ext4 $DEV $M
  [ "$(sha256sum < $M/data)" = "$sum" ] || fail "data changed across stop/recover"
  umount_checked $M $DEV
  stop_daemon_clean

  # Replica 1's backing disappears while the daemon is down.
  run mv "$T/r1.img" "$T/r1.moved"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  st=$(vol_status vol0)
  [ "$(replica_state "$st" 1)" = faulted ] || fail "missing replica not faulted: $st"
  [ "$(echo "$st" | json_top_field state)" = degraded ] || fail "volume not degraded: $st"
  [ ! -e "$T/r1.img" ] || fail "the daemon recreated a missing replica of an existing volume"
  run "$MOUNT" -t ext4 $DEV $M
  [ "$(sha256sum < $M/data)" = "$sum" ] || fail "data wrong when served by the remaining replica"
  umount_checked $M $DEV

  # kill -9 leaves vol0's device QUIESCED; a daemon whose config no longer has vol0 (another
  # volume, another state dir) reports it as an orphan and removes it only when asked.
  kill -KILL $DPID; wait $DPID 2>/dev/null
  STATE_DIR=/var/lib/ublkd/$SCENARIO-other DEVICE_ID=1 mkconf "$T/other.conf" vol1 64MiB "$T/o0.img"
  start_ublkd "$T/other.conf"
  wait_dev /dev/ublkb1
  "$UBLKCTL" --socket "$SOCK" orphans --output json > "$T/orphans.json" 2>&1 || fail "orphans failed: $(cat "$T/orphans.json")"
  o=$(tr -d ' \n' < "$T/orphans.json")
  case "$o" in *'"device_id":0,'*'"state":"quiesced"'*) ;; *) fail "orphan not listed: $o" ;; esac
  grep -q "not owned by any configured volume" "$T/ublkd.log" || fail "start-up did not report the orphan"
  [ -e /sys/class/ublk-char/ublkc0 ] || fail "orphan removed without being asked"
  run "$UBLKCTL" --socket "$SOCK" orphans --remove
  wait_for 10 eval '! [ -e /sys/class/ublk-char/ublkc0 ]' || fail "orphan still present after --remove"
  [ -b /dev/ublkb1 ] || fail "removing orphans touched the configured volume"
  stop_daemon_clean
  no_kernel_errors ublkb1
}

# ---------------------------------------------------------------------------------------------
# A host crash (daemon killed AND its device gone, as after a reboot) may leave the mirror's
# replicas different where writes were in flight: the next start resyncs the activity log's
# hot extents from the first replica to the other (reads pinned to it until then, status
# read_policy "primary"), then spreads reads again. The replicas end up identical, holding
# the first one's version of a block the "crash" left different.
unclean_restart() {
  need_ublk
  mkconf "$T/ublkd.conf" vol0 64MiB "$T/r0.img" "$T/r1.img"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  [ "$(vol_status vol0 | json_top_field read_policy)" = spread ] || fail "fresh volume not spreading reads: $(vol_status vol0)"
  run dd if=/dev/urandom of="$T/pat" bs=1M count=4
  run dd if="$T/pat" of=$DEV bs=1M seek=4 oflag=direct conv=fsync
  kill -KILL $DPID; wait $DPID 2>/dev/null
  # A write that reached the second replica only, inside the extent just written.
  run dd if=/dev/urandom of="$T/r1.img" bs=4096 count=1 seek=$((4 * 256 + 3)) conv=notrunc,fsync
  cmp -s -n $((64 << 20)) "$T/r0.img" "$T/r1.img" && fail "the replicas should differ before the resync"
  reboot_away_device
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  grep -q "unclean shutdown: resyncing" "$T/ublkd.log" || fail "daemon did not log the unclean shutdown"
  wait_for 120 eval 'grep -q "resync done" "$T/ublkd.log"' || fail "no resync: $(tail -5 "$T/ublkd.log")"
  wait_for 10 eval '[ "$(vol_status vol0 | json_top_field read_policy)" = spread ]' \
    || fail "reads not spread again after the resync: $(vol_status vol0)"
  run dd if=$DEV of="$T/rb" bs=1M skip=4 count=4 iflag=direct
  same_file "$T/pat" "$T/rb" "data after unclean restart"
  stop_daemon_clean
  cmp -s -n $((64 << 20)) "$T/r0.img" "$T/r1.img" || fail "replicas differ after the resync"
  start_ublkd "$T/ublkd.conf"
  wait_dev $DEV
  [ "$(vol_status vol0 | json_top_field read_policy)" = spread ] || fail "reads pinned again after a clean restart"
  stop_daemon_clean
  no_kernel_errors ublkb0
}

# ---------------------------------------------------------------------------------------------
# Two volumes without a configured device id start together and get distinct devices, kept
# across restarts; a forced stop of a mounted volume returns (no hang) and leaves the other
# volume serving.
two_volumes() {
  need_ublk
  cat > "$T/ublkd.conf" <<EOF
[node]
state_dir = "/var/lib/ublkd/$SCENARIO"
control_socket = "$SOCK"

[[volume]]
name = "va"
size = "32MiB"
block_size = 4096
replicas = [ { local = "$T/a.img" } ]

[[volume]]
name = "vb"
size = "32MiB"
block_size = 4096
replicas = [ { local = "$T/b.img" } ]
EOF
  cp "$T/ublkd.conf" "$T/last.conf"
  start_ublkd "$T/ublkd.conf"
  wait_live va 30; wait_live vb 30
  da=$(vol_status va | json_top_field device); db=$(vol_status vb | json_top_field device)
  [ -n "$da" ] && [ -n "$db" ] && [ "$da" != "$db" ] || fail "devices: va=$da vb=$db"
  stop_daemon_clean
  start_ublkd "$T/ublkd.conf"
  wait_live va 30; wait_live vb 30
  [ "$(vol_status va | json_top_field device)" = "$da" ] && [ "$(vol_status vb | json_top_field device)" = "$db" ] \
    || fail "device ids changed across a restart: $(vol_status va | json_top_field device) $(vol_status vb | json_top_field device)"
  wait_dev "$da"
  M=/mnt/$SCENARIO; mkdir -p $M
  run "$MKFS_EXT4" -F -q "$da"
  run "$MOUNT" -t ext4 "$da" $M
  timeout 30 "$UBLKCTL" --socket "$SOCK" stop va --force > "$T/force.out" 2>&1 || fail "forced stop failed or hung: $(cat "$T/force.out")"
  [ "$(vol_status va | json_top_field state)" = stopped ] || fail "va not stopped: $(vol_status va)"
  timeout 30 "$UMOUNT" $M || timeout 30 "$UMOUNT" -l $M || fail "cannot unmount the force-stopped volume"
  [ "$(vol_status vb | json_top_field state)" = live ] || fail "vb disturbed by stopping va: $(vol_status vb)"
  run dd if=/dev/zero of="$db" bs=4096 count=16 oflag=direct
  stop_daemon_clean
  wait_for 10 no_ublk_devices || fail "devices left: $(ls /sys/class/ublk-char/)"
}
