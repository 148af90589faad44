# smp: 2
# timeout: 600
#
# Multi-queue: the kernel gives a ublk device at most one hardware queue per CPU, so this suite
# boots with two vCPUs. Two queues, two fio jobs pinned to different CPUs (blk-mq maps the
# submitting CPU to a queue), write+verify on a 2-replica mirror, and both queue threads must
# have served requests.

SCENARIOS="two_queues_verify"
timeout_two_queues_verify=400

two_queues_verify() {
  need_ublk
  [ "$(nproc)" -ge 2 ] || fail "guest has $(nproc) CPU(s): this suite needs 2"
  QUEUES=2 mkconf "$T/ublkd.conf" vol0 256MiB "$T/r0.img" "$T/r1.img"
  start_ublkd "$T/ublkd.conf"
  wait_dev /dev/ublkb0
  wait_live vol0
  q=$(vol_status vol0 | json_top_field queues)
  [ "$q" = 2 ] || fail "volume reports $q queues, expected 2"
  [ "$(ls /sys/block/ublkb0/mq | wc -l)" = 2 ] || fail "blk-mq shows $(ls /sys/block/ublkb0/mq | wc -l) hw queues"
  # One job per CPU, each on its own 64 MiB region, verified.
  for cpu in 0 1; do
    "$FIO" --name=q$cpu --filename=/dev/ublkb0 --rw=randwrite --bs=4k --iodepth=16 \
      --ioengine=io_uring --direct=1 --offset=$((cpu * 128))M --size=64M --cpus_allowed=$cpu \
      --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$T/q$cpu.fio.log" &
    eval "fio$cpu=\$!"
  done
  wait "$fio0"; rc0=$?
  wait "$fio1"; rc1=$?
  cat "$T/q0.fio.log" "$T/q1.fio.log"
  [ $rc0 -eq 0 ] && [ $rc1 -eq 0 ] || fail "fio exited $rc0/$rc1"
  for l in "$T/q0.fio.log" "$T/q1.fio.log"; do
    grep -q 'err= *0' "$l" || fail "fio errors in $(basename "$l")"
  done
  # Both hardware queues dispatched requests (debugfs-free check: per-queue sysfs counters are
  # not exposed, so look at the daemon's per-queue thread CPU time instead).
  busy=0
  for t in /proc/$DPID/task/*; do
    ticks=$(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}')
    [ "$(cat "$t/comm")" = "vol-vol0" ] && [ "$ticks" -gt 0 ] && busy=$((busy + 1))
  done
  # The volume thread plus two queue threads share that name.
  [ "$busy" -ge 3 ] || fail "only $busy vol-vol0 threads used CPU: expected the volume thread and 2 queue threads"
  # Mirror: both replicas' data (the 256 MiB before each one's own label) identical after a
  # clean stop.
  stop_ublkd 30 || fail "ublkd did not stop cleanly"
  cmp -s -n $((256 << 20)) "$T/r0.img" "$T/r1.img" || fail "replicas differ"
  no_kernel_errors ublkb0
}
