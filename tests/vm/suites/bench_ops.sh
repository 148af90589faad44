# disks: 4 size=2G
# timeout: 900
#
# Operational figures, in one boot (run it three times for a headline: BENCHMARKS.md):
#   bench_restart_stall  the worst write stall of `systemctl restart ublkd` as systemd does it
#                        (SIGTERM: the owner hands its device over; then a new owner takes it
#                        back) under 4k randwrite QD32, on a 3-way volume (local raw virtio
#                        disk, replica servers 127.0.0.2/.3 on ext4), against the same run
#                        without a restart. RESULT restart_stall_ms, restart_nofault_maxlat_ms.
# Helpers from the bench suite.

. /tests/suites/bench.sh
SCENARIOS="bench_restart_stall"
timeout_bench_restart_stall=600

# restart_owner: SIGTERM the owner (hand-over), start the next one at once and wait until it
# serves: what `systemctl restart ublkd` does.
restart_owner() {
  kill -TERM "$DPID"
  wait_pid "$DPID" 60 || fail "the owner did not exit 0 on SIGTERM"
  start_ublkd "$T/$TAG.conf"
  wait_live bench 60
}

bench_restart_stall() {
  need_ublk
  set -- $VM_DISKS
  [ $# -ge 4 ] || fail "need 4 virtio disks, have: $VM_DISKS"
  local_disk=$3
  for d in "$4" "$2"; do run "$MKFS_EXT4" -q -F "$d"; done
  mkdir -p /mnt/srv2 /mnt/srv3
  run "$MOUNT" "$4" /mnt/srv2
  run "$MOUNT" "$2" /mnt/srv3
  cluster_secret
  LOG_LEVEL=warn replica_server 2 /mnt/srv2
  LOG_LEVEL=warn replica_server 3 /mnt/srv3
  TAG=restart; wipe_label "$local_disk"
  repl_owner $TAG "{ local = \"$local_disk\" }, { remote = \"127.0.0.2:7450\", id = \"rs\" }, { remote = \"127.0.0.3:7450\", id = \"rs\" }"
  run "$FIO" --name=fill --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=write --bs=1M \
    --iodepth=4 --size=$REGION --output=/dev/null
  stall_run nofault true
  nofault=$STALL_MS
  _from=$(($(wc -l < "$T/ublkd.log") + 1))
  stall_run restart restart_owner
  stall=$STALL_MS
  # log_level warn: the hand-over's own line is info; its outcome shows in the next start.
  ! tail -n +$_from "$T/ublkd.log" | grep -q "unclean shutdown" || fail "a resync after the hand-over"
  [ "$(vol_status bench | json_top_field state)" = live ] || fail "not live after the restart: $(vol_status bench)"
  echo "RESULT restart_nofault_maxlat_ms=$nofault"
  echo "RESULT restart_stall_ms=$stall"
  echo "TABLE restart: worst 4k randwrite QD32 completion across a SIGTERM hand-over + new owner: $stall ms (without a restart: $nofault ms)"
  stop_ublkd 60 || fail "owner did not stop"
}
