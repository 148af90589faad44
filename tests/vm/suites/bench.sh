# disks: 2 size=1G
# timeout: 1800
#
# Benchmark: ublkd (one local replica) against the kernel loop driver (losetup --direct-io=on)
# over the same kind of backing store, in ONE boot so the ratios compare like with like.
#   bench_virtio  each device on its own virtio disk (the headline: the disk dominates, as on
#                 real hardware); ublkd uses the raw /dev/vdX as its replica.
#   bench_tmpfs   each device on a file in tmpfs: no disk cost, so the ratio shows the CPU
#                 overhead of the ublk path itself.
# Workloads (fio, io_uring, direct=1, one job: the guest has one vCPU, so one ublk queue):
# 4k randread/randwrite at QD1 and QD32, 128k sequential write at QD8.
# Prints `RESULT name=value` lines (the host collects them) and a table.

SCENARIOS="bench_virtio bench_tmpfs"
timeout_bench_virtio=900
timeout_bench_tmpfs=900

REGION=256M          # fio working set (prefilled by the sequential write)
RUNTIME=${BENCH_RUNTIME:-10}
RAMP=2

# fio_run DEV RW BS QD NAME: run one job, print "iops lat_us MiBps" (terse v3 fields:
# read 8=iops 7=KiB/s 40=lat mean; write 49=iops 48=KiB/s 81=lat mean).
fio_run() {
  _out="$T/$5.terse"
  "$FIO" --name="$5" --filename="$1" --ioengine=io_uring --direct=1 --rw="$2" --bs="$3" \
    --iodepth="$4" --numjobs=1 --size=$REGION --time_based --runtime=$RUNTIME --ramp_time=$RAMP \
    --norandommap --randrepeat=0 --minimal > "$_out" 2> "$T/$5.err" \
    || fail "fio $5 failed: $(head -c 300 "$T/$5.err")"
  case "$2" in
    *read) awk -F';' '{printf "%d %.1f %.1f\n", $8, $40, $7/1024}' "$_out" ;;
    *)     awk -F';' '{printf "%d %.1f %.1f\n", $49, $81, $48/1024}' "$_out" ;;
  esac
}

# ticks_of PID: user and system clock ticks of all its threads.
ticks_of() {
  for _t in /proc/$1/task/*; do sed 's/.*) //' "$_t/stat" | awk '{print $12, $13}'; done \
    | awk '{u += $1; s += $2} END {print u + 0, s + 0}'
}

# per_io TICKS: ticks spent over the last ublk run, per request, in µs (USER_HZ is 100).
per_io() { awk -v d="$1" -v n="$u_iops" -v t=$((RUNTIME + RAMP)) 'BEGIN { printf "%.0f", d * 1e4 / (n * t) }'; }

# bench_pair TAG UBLK_DEV LOOP_DEV: the workload matrix on both devices, alternating them so
# slow drift of the emulator hits both alike. Emits RESULT lines and ratios.
bench_pair() {
  _tag=$1 _u=$2 _l=$3
  # Prefill both (random reads of never-written blocks would read holes).
  run "$FIO" --name=fill --filename="$_u" --ioengine=io_uring --direct=1 --rw=write --bs=1M \
    --iodepth=4 --size=$REGION --output=/dev/null
  run "$FIO" --name=fill --filename="$_l" --ioengine=io_uring --direct=1 --rw=write --bs=1M \
    --iodepth=4 --size=$REGION --output=/dev/null
  for w in "randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32" "write 128k 8"; do
    set -- $w
    name="${1}_qd$3"; [ "$1" = write ] && name="seqwrite128k_qd$3"
    set -- $(fio_run "$_l" "$1" "$2" "$3" "loop_${_tag}_$name") $(ticks_of "$DPID")
    l_iops=$1 l_lat=$2 l_mib=$3 c0u=$4 c0s=$5
    set -- $w
    set -- $(fio_run "$_u" "$1" "$2" "$3" "ublk_${_tag}_$name") $(ticks_of "$DPID")
    u_iops=$1 u_lat=$2 u_mib=$3
    # Daemon CPU per request, user and kernel, in µs of (emulated) CPU.
    u_cpu=$(per_io $(($4 - c0u))) s_cpu=$(per_io $(($5 - c0s)))
    echo "RESULT ${_tag}_ublkd_user_us_per_io_${name}=$u_cpu"
    echo "RESULT ${_tag}_ublkd_sys_us_per_io_${name}=$s_cpu"
    echo "RESULT ${_tag}_loop_${name}_iops=$l_iops"
    echo "RESULT ${_tag}_ublk_${name}_iops=$u_iops"
    echo "RESULT ${_tag}_loop_${name}_lat_us=$l_lat"
    echo "RESULT ${_tag}_ublk_${name}_lat_us=$u_lat"
    case $name in seq*) echo "RESULT ${_tag}_loop_${name}_mibps=$l_mib"; echo "RESULT ${_tag}_ublk_${name}_mibps=$u_mib" ;; esac
    ratio=$(awk -v u="$u_iops" -v l="$l_iops" 'BEGIN { if (l > 0) printf "%.2f", u / l; else print "nan" }')
    echo "RESULT ${_tag}_ratio_${name}=$ratio"
    echo "$ratio" > "$T/ratio_$name"
    printf 'TABLE %-8s %-20s loop %8s IOPS %9s us | ublk %8s IOPS %9s us | ratio %s | ublkd cpu/io user %s us sys %s us\n' \
      "$_tag" "$name" "$l_iops" "$l_lat" "$u_iops" "$u_lat" "$ratio" "$u_cpu" "$s_cpu"
    [ "$u_iops" -gt 0 ] && [ "$l_iops" -gt 0 ] || fail "zero IOPS in $name"
  done
}

start_bench_ublkd() {
  LOG_LEVEL=warn QUEUES=1 DEPTH=128 mkconf "$T/ublkd.conf" bench 512MiB "$1"
  start_ublkd "$T/ublkd.conf"
  wait_dev /dev/ublkb0
}

# finish_bench TAG PREFIX LOOPDEV: headline ratios under their issue names, then clean up.
finish_bench() {
  for r in randread_qd32 randwrite_qd32; do
    echo "RESULT $2$r=$(cat "$T/ratio_$r")"
  done
  run "$LOSETUP" -d "$3"
  stop_ublkd 60 || fail "ublkd did not stop cleanly"
}

bench_virtio() {
  need_ublk
  set -- $VM_DISKS
  [ $# -ge 2 ] || fail "need 2 virtio disks, have: $VM_DISKS"
  start_bench_ublkd "$1"
  # Idle cost: a serving volume with no I/O should cost (almost) nothing.
  sleep 2; set -- $(ticks_of "$DPID"); sleep 10; set -- "$@" $(ticks_of "$DPID")
  echo "RESULT ublkd_idle_cpu_ms_per_10s=$(( ($3 + $4 - $1 - $2) * 10 ))"
  set -- $VM_DISKS
  loopdev=$("$LOSETUP" --direct-io=on --show -f "$2") || fail "losetup $2"
  bench_pair virtio /dev/ublkb0 "$loopdev"
  finish_bench virtio ratio_ "$loopdev"
}

bench_tmpfs() {
  need_ublk
  mkdir -p /tmp/bench
  run dd if=/dev/zero of=/tmp/bench/loop.img bs=1M count=0 seek=512
  start_bench_ublkd /tmp/bench/ublk.img
  loopdev=$("$LOSETUP" --direct-io=on --show -f /tmp/bench/loop.img) || fail "losetup"
  bench_pair tmpfs /dev/ublkb0 "$loopdev"
  finish_bench tmpfs cpu_ratio_ "$loopdev"
  rm -rf /tmp/bench
}
