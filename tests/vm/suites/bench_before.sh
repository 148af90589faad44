# disks: 4 size=2G
# timeout: 1500
#
# What a range of commits costs on the write path, in one boot: the build under test against
# `ublkd-before`, the build of an older commit, given by the host:
#   git worktree add /tmp/before fc3711d && (cd /tmp/before && cargo build --release -p ublkd)
#   UBLKD_VM_EXTRA_BINS=/tmp/before/target/release/ublkd:ublkd-before tests/vm/run bench_before
# A 3-way volume (local raw virtio disk + two replica servers over loopback TCP on ext4), 4k
# randwrite QD32, BENCH_ROUNDS (5) rounds of each build alternating (owner and servers both the build of
# the round), each build on its own disks and replicas (an older build may not read the
# newer one's labels): RESULT ratio_TAG_vs_before_randwrite_qd32 (BENCH_BEFORE_TAG, default
# safety: the issue that asked for it) is the ratio of the medians. Helpers from
# the bench suite.

. /tests/suites/bench.sh
SCENARIOS="bench_vs_before"
timeout_bench_vs_before=1400

bench_vs_before() {
  need_ublk
  before=/usr/local/bin/ublkd-before
  [ -x $before ] || fail "no $before: give the host UBLKD_VM_EXTRA_BINS=PATH:ublkd-before"
  set -- $VM_DISKS
  [ $# -ge 4 ] || fail "need 4 virtio disks, have: $VM_DISKS"
  local_new=$1 local_old=$3
  for d in "$2" "$4"; do run "$MKFS_EXT4" -q -F "$d"; done
  mkdir -p /mnt/new /mnt/old
  run "$MOUNT" "$2" /mnt/new
  run "$MOUNT" "$4" /mnt/old
  cluster_secret
  reps() { echo "{ local = \"$1\" }, { remote = \"127.0.0.2:7450\", id = \"sb\" }, { remote = \"127.0.0.3:7450\", id = \"sb\" }"; }
  # side BIN: which build's disks a round uses.
  side() { if [ "$1" = "$UBLKD" ]; then echo new; else echo old; fi; }
  # Each build's servers keep their replicas, config and state on its own disk.
  servers() {
    for n in 2 3; do
      mkdir -p "/mnt/$2/s$n"
      UBLKD_BIN=$1 LOG_LEVEL=warn replica_server $n "/mnt/$2/s$n" "/mnt/$2/s$n" >&2
    done
  }
  servers_stop() { kill -TERM "$SRV_2" "$SRV_3"; wait_pid "$SRV_2" 20; wait_pid "$SRV_3" 20; }
  # Each build fills its own volume once (the same replicas serve all its rounds).
  for bin in "$UBLKD" "$before"; do
    s=$(side "$bin")
    eval "disk=\$local_$s"
    servers "$bin" "$s"
    UBLKD_BIN=$bin repl_owner "$s" "$(reps "$disk")"
    prefill
    stop_ublkd 60 || fail "owner ($s) did not stop"
    servers_stop
  done
  safety_round() {
    _s=$(side "$1")
    eval "_disk=\$local_$_s"
    servers "$1" "$_s"
    cost_round "$1" "$_s" "$(reps "$_disk")"
    servers_stop >&2
  }
  alternate before "3-way randwrite QD32" safety_round "$UBLKD" "$before"
  mn=$(median $ALT_A) mo=$(median $ALT_B)
  echo "RESULT before_new_randwrite_qd32_iops=$mn"
  echo "RESULT before_old_randwrite_qd32_iops=$mo"
  echo "RESULT ratio_${BENCH_BEFORE_TAG:-safety}_vs_before_randwrite_qd32=$(awk -v a="$mn" -v b="$mo" 'BEGIN { printf "%.3f", a / b }')"
  echo "RESULT before_new_owner_cpu_us_per_io=$(median $CPU_A)"
  echo "RESULT before_old_owner_cpu_us_per_io=$(median $CPU_B)"
  echo "TABLE before: 3-way 4k randwrite QD32, medians of ${BENCH_ROUNDS:-5} alternating rounds: $mn IOPS against $mo before ($(median $CPU_A) against $(median $CPU_B) owner CPU us per request)"
}
