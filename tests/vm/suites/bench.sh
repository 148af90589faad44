# disks: 4 size=2G
# timeout: 2400
# variants: bench-crc-frames bench-unordered bench-no-dirty-log bench-cheap-payload-tag
#
# Benchmark: ublkd (one local replica) against the kernel loop driver (losetup --direct-io=on)
# over the same kind of backing store, in ONE boot so the ratios compare like with like.
#   bench_virtio  each device on its own virtio disk (the headline: the disk dominates, as on
#                 real hardware); ublkd uses the raw /dev/vdX as its replica. Disks 1 and 2.
#   bench_tmpfs   each device on a file in tmpfs: no disk cost, so the ratio shows the CPU
#                 overhead of the ublk path itself.
#   bench_mdraid1 the kernel's own network mirror, the baseline for replicated volumes: md raid1
#                 over a loop device on disk 3 and an nbd device (TCP 127.0.0.1, qemu-nbd with
#                 O_DIRECT) on disk 4. Its numbers also go to $MDRAID1_ENV for later scenarios.
#   bench_mdraid1_nvmetcp  the same over a loop device and an NVMe/TCP namespace (the kernel's
#                 nvmet-tcp target exporting disk 4, the nvme-tcp host on 127.0.0.1:4420): the
#                 transport Mayastor uses, and the stronger kernel baseline.
#   bench_replicated  ublkd with remote replicas, on the same disks as bench_mdraid1: the local
#                 replica on raw disk 3, replica servers (127.0.0.2/.3, separate ublkd processes)
#                 storing on ext4 on disk 4 and disk 2. 1 local, 1 local + 1 remote, 1 local +
#                 2 remote; ratios against both md raid1 baselines; worst write latency across a
#                 SIGKILL and a SIGSTOP of a replica server.
#   bench_rebuild rebuilds, on the disks of bench_replicated: a full rebuild onto a new remote
#                 replica (uncapped) against a raw copy of the same bytes over loopback TCP
#                 (dd from the local disk to an nbd device whose qemu-nbd writes a file on
#                 server 3's filesystem);
#                 the bytes a partial rebuild copies against the regions dirtied while its
#                 server was down; application 4k randwrite QD32 IOPS during a rebuild at the
#                 default cap against without one; the dirty log's cost on a degraded volume
#                 (against the bench-no-dirty-log build).
#   bench_ha      the HA monitor's swap: a 1 GiB volume with 512 MiB written (local replica a
#                 file on ext4 on disk 1, replica servers on ext4 on disks 2 and 3, a spare on
#                 disk 4), 4k randwrite QD8 for 30 s; a server SIGKILLed 5 s in: seconds until
#                 the replacement takes writes, until every replica is online again (the
#                 volume idle after fio), and the worst write latency across the swap.
#   bench_costs   what protocol v2's frame tags and the range table cost: the same volume run
#                 alternately by ublkd and by a cost-model build (feature bench-crc-frames:
#                 v1's CRC32C instead of SipHash tags; bench-unordered: no range table).
#   bench_snapshot  snapshots (issue 18), three volumes whose replica files share ext4 on disk 1:
#                 `flat` (never snapshotted: the flat store), `snap` (1 GiB) and `big` (16 GiB),
#                 both fragmented by 4k random writes first. snapshot_create_ms_{1g,16g}: the
#                 daemon's time for `ublkctl snapshot create` (name check, list, record, barrier,
#                 the replica's commit, the label), median of 5, and the writes-held time;
#                 snapshot_maxlat_{create,base}_ms: the worst 4k write latency of fio QD8 across
#                 three creates, and in the same run length without; with 10 snapshots on
#                 `snap`, 4k QD32 randread (blocks spread over the layers) and steady randwrite
#                 (the head holds the blocks) against `flat`, and the first pass of random
#                 writes right after a snapshot (every write a first touch) against the same
#                 pass on `flat`, each pair run back to back; snapshot_export_mib_s: a 1 GiB
#                 snapshot exported raw to ext4 on disk 2, against dd copying the device there
#                 (ratio_export_vs_dd).
# Workloads (fio, io_uring, direct=1, one job: the guest has one vCPU, so one ublk queue):
# 4k randread/randwrite at QD1 and QD32, 128k sequential write at QD8.
# Prints `RESULT name=value` lines (the host collects them) and a table.

SCENARIOS="bench_virtio bench_tmpfs bench_mdraid1 bench_mdraid1_nvmetcp bench_replicated bench_costs bench_rebuild bench_ha bench_snapshot"
timeout_bench_virtio=900
timeout_bench_tmpfs=900
timeout_bench_mdraid1=900
timeout_bench_mdraid1_nvmetcp=900
timeout_bench_replicated=1200
timeout_bench_costs=900
timeout_bench_rebuild=1500
timeout_bench_ha=900
timeout_bench_snapshot=1200

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

# ---------------------------------------------------------------------------------------------
# bench_mdraid1: md raid1 (metadata 1.2, no write-intent bitmap, --assume-clean so no initial
# resync competes with fio) over two legs on the 3rd and 4th virtio disks:
#   leg A  loop device with --direct-io=on on disk 3 (the "local replica");
#   leg B  /dev/nbd0, attached by nbd-client (netlink) over TCP to 127.0.0.1:$NBD_PORT, where
#          qemu-nbd exports disk 4 with --cache=none (O_DIRECT: no page cache in the server, so
#          reads really hit the disk) and --aio=io_uring (the "remote replica").
# Same fio matrix as bench_pair. Emits `RESULT mdraid1_<workload>_iops|_lat_us[|_mibps]=N` and
# writes the same `mdraid1_<workload>_iops=N` lines to $MDRAID1_ENV, so a later scenario in the
# same boot can compute ratios against it (the file appears only when the whole matrix ran),
# plus qemu-nbd's CPU per md request (mdraid1_nbdserver_{user,sys}_us_per_io_<workload>).
# md reads from one leg at a time (read balancing), writes go to both: the per-leg I/O counts
# are printed as RESULT mdraid1_leg_{loop,nbd}_{reads,writes}.
MDRAID1_ENV=/tmp/bench-mdraid1.env
NBD_PORT=10809

# blk_ios DEV: "reads writes" completed by DEV since it appeared (/sys/block/DEV/stat).
blk_ios() { awk '{print $1, $5}' "/sys/block/${1#/dev/}/stat"; }

# md_matrix TAG LEG_A LEG_B LEG_B_NAME SERVER_PID ENV: md raid1 (metadata 1.2, no write-intent
# bitmap, --assume-clean) over the two legs, prefilled, the fio matrix, per-leg I/O counts; the
# `TAG_<workload>_iops=N` lines also go to ENV (written only when the whole matrix ran). With a
# SERVER_PID (a user-space server behind leg B), its CPU per md request too. Stops the array.
md_matrix() {
  _tag=$1 _a=$2 _b=$3 _bn=$4 _srv=$5 _env=$6
  rm -f "$_env" "$_env.tmp"
  # The mirror. No udev: mdadm makes /dev/md0 itself (devtmpfs has it anyway).
  run "$MDADM" --create /dev/md0 --level=1 --raid-devices=2 --metadata=1.2 --bitmap=none \
    --assume-clean --run "$_a" "$_b"
  wait_dev /dev/md0
  cat /proc/mdstat
  grep -A1 '^md0 :' /proc/mdstat | grep -q '\[UU\]' || fail "md0 not [UU]: $(tr '\n' ' ' < /proc/mdstat)"
  ! grep -qE 'resync|recovery' /proc/mdstat || fail "md0 is resyncing despite --assume-clean"

  # Prefill (random reads of never-written blocks would read holes).
  run "$FIO" --name=fill --filename=/dev/md0 --ioengine=io_uring --direct=1 --rw=write --bs=1M \
    --iodepth=4 --size=$REGION --output=/dev/null
  set -- $(blk_ios "$_a") $(blk_ios "$_b")
  a_r0=$1 a_w0=$2 b_r0=$3 b_w0=$4
  for w in "randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32" "write 128k 8"; do
    set -- $w
    name="${1}_qd$3"; [ "$1" = write ] && name="seqwrite128k_qd$3"
    if [ "$_srv" != 0 ]; then
      set -- $(ticks_of "$_srv") $(fio_run /dev/md0 "$1" "$2" "$3" "${_tag}_$name") $(ticks_of "$_srv")
      [ $# -eq 7 ] || fail "fio $name: $(head -c 300 "$T/${_tag}_$name.err")"
      iops=$3 lat=$4 mib=$5 u_iops=$3
      srv_u=$(per_io $(($6 - $1))) srv_s=$(per_io $(($7 - $2)))
    else
      set -- $(fio_run /dev/md0 "$1" "$2" "$3" "${_tag}_$name")
      [ $# -eq 3 ] || fail "fio $name: $(head -c 300 "$T/${_tag}_$name.err")"
      iops=$1 lat=$2 mib=$3 srv_u=- srv_s=-
    fi
    [ "$iops" -gt 0 ] || fail "zero IOPS in $name"
    { echo "${_tag}_${name}_iops=$iops"
      echo "${_tag}_${name}_lat_us=$lat"
      case $name in seq*) echo "${_tag}_${name}_mibps=$mib" ;; esac
      [ "$_srv" = 0 ] || echo "${_tag}_${_bn}server_user_us_per_io_${name}=$srv_u"
      [ "$_srv" = 0 ] || echo "${_tag}_${_bn}server_sys_us_per_io_${name}=$srv_s"
    } >> "$_env.tmp"
    printf 'TABLE %-8s %-20s md raid1 (loop + %s) %8s IOPS %9s us | %s server cpu/io user %s us sys %s us\n' \
      "$_tag" "$name" "$_bn" "$iops" "$lat" "$_bn" "$srv_u" "$srv_s"
  done
  sed 's/^/RESULT /' "$_env.tmp"

  # Both legs took every write (no leg dropped out); reads went wherever md balanced them.
  set -- $(blk_ios "$_a") $(blk_ios "$_b")
  echo "RESULT ${_tag}_leg_loop_reads=$(($1 - a_r0))"
  echo "RESULT ${_tag}_leg_loop_writes=$(($2 - a_w0))"
  echo "RESULT ${_tag}_leg_${_bn}_reads=$(($3 - b_r0))"
  echo "RESULT ${_tag}_leg_${_bn}_writes=$(($4 - b_w0))"
  grep -A1 '^md0 :' /proc/mdstat | grep -q '\[UU\]' || fail "md0 degraded after the run: $(tr '\n' ' ' < /proc/mdstat)"
  [ $(($4 - b_w0)) -gt 0 ] && [ $(($2 - a_w0)) -gt 0 ] || fail "a leg got no writes"
  mv "$_env.tmp" "$_env"
  run "$MDADM" --stop /dev/md0
  run "$MDADM" --zero-superblock "$_a" "$_b"
}

bench_mdraid1() {
  set -- $VM_DISKS
  [ $# -ge 4 ] || fail "need 4 virtio disks (bench_mdraid1 uses the 3rd and 4th), have: $VM_DISKS"
  disk_a=$3 disk_b=$4
  for m in raid1 md_mod nbd loop; do grep -q "^$m " /proc/modules || fail "module $m not loaded"; done

  # Leg A: kernel loop, direct I/O on the virtio disk.
  loopdev=$("$LOSETUP" --direct-io=on --show -f "$disk_a") || fail "losetup $disk_a"
  [ "$(cat "/sys/block/${loopdev#/dev/}/loop/dio")" = 1 ] || fail "$loopdev: direct I/O is off"
  # Leg B: NBD server on loopback TCP. A child of this shell, so the runner's cleanup kills it if
  # the scenario fails; --persistent keeps it up across client reconnects.
  say "+ $QEMU_NBD -f raw --cache=none --aio=io_uring -x mirror -b 127.0.0.1 -p $NBD_PORT -t $disk_b"
  "$QEMU_NBD" -f raw --cache=none --aio=io_uring --discard=ignore --detect-zeroes=off \
    -x mirror -b 127.0.0.1 -p $NBD_PORT -t "$disk_b" > "$T/qemu-nbd.log" 2>&1 &
  nbd_srv=$!
  wait_for 20 tcp_listening 127.0.0.1 $NBD_PORT \
    || fail "qemu-nbd not listening on 127.0.0.1:$NBD_PORT: $(head -c 300 "$T/qemu-nbd.log")"
  run "$NBD_CLIENT" 127.0.0.1 $NBD_PORT /dev/nbd0 -N mirror
  wait_dev /dev/nbd0
  md_matrix mdraid1 "$loopdev" /dev/nbd0 nbd "$nbd_srv" "$MDRAID1_ENV"

  # Teardown, innermost first.
  run "$NBD_CLIENT" -d /dev/nbd0
  kill -TERM "$nbd_srv"
  wait_pid "$nbd_srv" 10
  run "$LOSETUP" -d "$loopdev"
}

# ---------------------------------------------------------------------------------------------
# bench_mdraid1_nvmetcp: md raid1 over the loop leg (disk 3) and an NVMe/TCP namespace: the
# kernel's nvmet-tcp target exports disk 4 on 127.0.0.1:4420 (configfs), the kernel's nvme-tcp
# host connects to it (/dev/nvme-fabrics). Everything in the kernel: no user-space server on
# the remote leg. Writes `mdraid1nvme_<workload>_iops=N` to $NVMETCP_ENV.
NVMETCP_ENV=/tmp/bench-mdraid1-nvmetcp.env
NQN=nqn.2026-12.io.ublkd:bench

bench_mdraid1_nvmetcp() {
  set -- $VM_DISKS
  [ $# -ge 4 ] || fail "need 4 virtio disks, have: $VM_DISKS"
  disk_a=$3 disk_b=$4
  for m in raid1 nvmet_tcp nvme_tcp loop; do grep -q "^$m " /proc/modules || fail "module $m not loaded"; done
  grep -q configfs /proc/mounts || run mount -t configfs none /sys/kernel/config
  cfs=/sys/kernel/config/nvmet
  [ -d $cfs ] || fail "no $cfs (nvmet not loaded?)"
  run mkdir $cfs/subsystems/$NQN
  echo 1 > $cfs/subsystems/$NQN/attr_allow_any_host
  run mkdir $cfs/subsystems/$NQN/namespaces/1
  echo -n "$disk_b" > $cfs/subsystems/$NQN/namespaces/1/device_path
  echo 1 > $cfs/subsystems/$NQN/namespaces/1/enable || fail "cannot enable the nvmet namespace on $disk_b"
  run mkdir $cfs/ports/1
  echo tcp > $cfs/ports/1/addr_trtype
  echo ipv4 > $cfs/ports/1/addr_adrfam
  echo 127.0.0.1 > $cfs/ports/1/addr_traddr
  echo 4420 > $cfs/ports/1/addr_trsvcid
  run ln -s $cfs/subsystems/$NQN $cfs/ports/1/subsystems/$NQN
  wait_for 10 tcp_listening 127.0.0.1 4420 || fail "nvmet-tcp not listening on 127.0.0.1:4420"
  echo "transport=tcp,traddr=127.0.0.1,trsvcid=4420,nqn=$NQN" > /dev/nvme-fabrics \
    || fail "nvme-tcp connect failed: $(dmesg | tail -n 3 | tr '\n' ' ')"
  ctrl=""
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = $NQN ] && ctrl=${c##*/}
  done
  [ -n "$ctrl" ] || fail "no NVMe/TCP controller for $NQN: $(ls /sys/class/nvme/ 2>&1 | tr '\n' ' ')"
  # With native multipath the block device is the subsystem's head (nvmeXnY, X the
  # subsystem's instance); nvmeXcZnY is its hidden per-controller path.
  nvme_head() {
    for b in /sys/block/nvme*n*; do
      case ${b##*/} in *c*n*) continue ;; esac
      [ -e "$b" ] && { echo "/dev/${b##*/}"; return 0; }
    done
    return 1
  }
  wait_for 10 nvme_head || fail "no NVMe/TCP namespace block device: $(ls /sys/block | tr '\n' ' ')"
  nsdev=$(nvme_head)
  wait_dev "$nsdev"
  say "NVMe/TCP namespace $nsdev (controller $ctrl) over 127.0.0.1:4420"
  loopdev=$("$LOSETUP" --direct-io=on --show -f "$disk_a") || fail "losetup $disk_a"
  md_matrix mdraid1nvme "$loopdev" "$nsdev" nvme 0 "$NVMETCP_ENV"
  echo 1 > /sys/class/nvme/$ctrl/delete_controller
  rm -f $cfs/ports/1/subsystems/$NQN
  rmdir $cfs/ports/1 $cfs/subsystems/$NQN/namespaces/1 $cfs/subsystems/$NQN
  run "$LOSETUP" -d "$loopdev"
}

# ---------------------------------------------------------------------------------------------
# bench_replicated: see the header. The owner is one ublkd (one queue), each replica server
# another ublkd process; all share the one vCPU with fio, as md raid1 shares it with qemu-nbd.
REPL_TIMEOUT_MS=2000

# wipe_label DEV: zero the label area of a raw-disk replica of the 512 MiB bench volume, so
# the next owner with a fresh state dir starts a new volume on it (otherwise the disk's
# label makes it the old volume, and new remote replicas join it as not yet rebuilt), and
# its first MiB: an unlabelled disk holding a signature (md's superblock from the baseline)
# is refused as someone's data.
wipe_label() {
  run dd if=/dev/zero of="$1" bs=64k count=1 seek=$((512 * 16)) oflag=direct conv=notrunc 2>/dev/null
  run dd if=/dev/zero of="$1" bs=1M count=1 oflag=direct conv=notrunc 2>/dev/null
}

# prefill [SIZE]: write SIZE ($REGION) of /dev/ublkb0 sequentially, 1 MiB at a time: the
# workloads then read and overwrite data, not holes.
prefill() {
  run "$FIO" --name=fill --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=write --bs=1M \
    --iodepth=4 --size="${1:-$REGION}" --output=/dev/null
}

# repl_owner TAG REPLICAS: an owner (state dir $T/owner-TAG, config $T/TAG.conf) serving
# /dev/ublkb0 with every replica online (a measurement of fewer replicas than configured would
# be meaningless). VOL_SIZE (512MiB) sizes the volume; VOL_EXTRA is one more volume key.
repl_owner() {
  cat > "$T/$1.conf" <<EOF
[node]
state_dir = "$T/owner-$1"
control_socket = "$SOCK"
cluster_secret_file = "$T/cluster.key"
io_timeout_ms = $REPL_TIMEOUT_MS
log_level = "warn"

[[volume]]
name = "bench"
size = "${VOL_SIZE:-512MiB}"
block_size = 4096
queues = 1
depth = 128
device_id = 0
${VOL_EXTRA:-}
replicas = [ $2 ]
EOF
  if [ -n "${REBUILD_RATE:-}" ]; then
    printf '\n[rebuild]\nrate = "%s"\n' "$REBUILD_RATE" >> "$T/$1.conf"
  fi
  cp "$T/$1.conf" "$T/last.conf"
  start_ublkd "$T/$1.conf"
  wait_dev /dev/ublkb0 60
  wait_live bench 30
}

# repl_matrix TAG: prefill, then the 4k matrix on /dev/ublkb0: RESULT repl_TAG_<workload>_*.
repl_matrix() {
  prefill
  for w in "randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32"; do
    set -- $w
    name="${1}_qd$3"
    set -- $(ticks_of "$DPID") $(fio_run /dev/ublkb0 "$1" "$2" "$3" "repl_${TAG}_$name") $(ticks_of "$DPID")
    [ $# -eq 7 ] || fail "fio $TAG $name"
    u_iops=$3
    cpu_u=$(per_io $(($6 - $1))) cpu_s=$(per_io $(($7 - $2)))
    echo "RESULT repl_${TAG}_${name}_iops=$3"
    echo "RESULT repl_${TAG}_${name}_lat_us=$4"
    echo "RESULT repl_${TAG}_owner_user_us_per_io_${name}=$cpu_u"
    echo "RESULT repl_${TAG}_owner_sys_us_per_io_${name}=$cpu_s"
    echo "repl_${TAG}_${name}_iops=$3" >> "$T/repl.env"
    printf 'TABLE %-8s %-16s %8s IOPS %9s us | owner cpu/io user %s us sys %s us\n' "$TAG" "$name" "$3" "$4" "$cpu_u" "$cpu_s"
    [ "$3" -gt 0 ] || fail "zero IOPS in $TAG $name"
  done
}

# stall_run NAME CMD...: 4k randwrite QD32 for 12 s; CMD runs after 4 s (in this shell: it may
# restart the owner). STALL_MS: the worst completion latency in ms (terse field 80: write
# total latency max, µs); fails on errors.
stall_run() {
  _name=$1; shift
  "$FIO" --name="$_name" --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --size=$REGION --time_based --runtime=12 --norandommap --randrepeat=0 \
    --minimal > "$T/$_name.terse" 2> "$T/$_name.err" &
  _f=$!
  sleep 4
  "$@"
  wait $_f || fail "fio $_name failed: $(head -c 300 "$T/$_name.err")"
  STALL_MS=$(awk -F';' '{ if ($5 != 0) exit 1; printf "%d\n", $80 / 1000 }' "$T/$_name.terse") \
    || fail "fio $_name reported errors"
}

# repl_disks: the disks of a replicated volume: local_disk (the third, raw), ext4 on the
# fourth and the second mounted on /mnt/srv2 and /mnt/srv3 for the replica servers, the
# cluster secret.
repl_disks() {
  set -- $VM_DISKS
  [ $# -ge 4 ] || fail "need 4 virtio disks, have: $VM_DISKS"
  local_disk=$3
  for d in "$4" "$2"; do run "$MKFS_EXT4" -q -F "$d"; done
  mkdir -p /mnt/srv2 /mnt/srv3
  run "$MOUNT" "$4" /mnt/srv2
  run "$MOUNT" "$2" /mnt/srv3
  cluster_secret
}

bench_replicated() {
  need_ublk
  repl_disks
  LOG_LEVEL=warn replica_server 2 /mnt/srv2
  LOG_LEVEL=warn replica_server 3 /mnt/srv3
  : > "$T/repl.env"
  L="{ local = \"$local_disk\" }"
  R2() { echo "{ remote = \"127.0.0.2:7450\", id = \"$1\" }"; }
  R3() { echo "{ remote = \"127.0.0.3:7450\", id = \"$1\" }"; }

  # Each configuration is a new volume on the same local disk.
  TAG=1local; wipe_label "$local_disk"; repl_owner $TAG "$L"; repl_matrix; stop_ublkd 60 || fail "owner did not stop"
  TAG=2way; wipe_label "$local_disk"; repl_owner $TAG "$L, $(R2 b2)"; repl_matrix; stop_ublkd 60 || fail "owner did not stop"
  TAG=3way; wipe_label "$local_disk"; repl_owner $TAG "$L, $(R2 b3), $(R3 b3)"; repl_matrix

  # Worst write latency: without a fault, then across a SIGKILL and a SIGSTOP of a server.
  stall_run nofault true; ms=$STALL_MS
  echo "RESULT maxlat_nofault_ms=$ms"
  stop_ublkd 60 || fail "owner did not stop"
  TAG=kill; wipe_label "$local_disk"; repl_owner $TAG "$L, $(R2 k), $(R3 k)"
  stall_run kill kill -KILL "$SRV_3"; ms=$STALL_MS
  echo "RESULT stall_kill_ms=$ms"
  vol_status bench | grep -q '"state":"faulted"' || fail "killed replica not faulted: $(vol_status bench)"
  stop_ublkd 60 || fail "owner did not stop"
  wait "$SRV_3" 2>/dev/null
  LOG_LEVEL=warn replica_server 3 /mnt/srv3
  TAG=stop; wipe_label "$local_disk"; repl_owner $TAG "$L, $(R2 s), $(R3 s)"
  stall_run stop kill -STOP "$SRV_2"; ms=$STALL_MS
  kill -CONT "$SRV_2"
  echo "RESULT stall_stop_ms=$ms"
  echo "RESULT stall_stop_deadline_ms=$REPL_TIMEOUT_MS"
  vol_status bench | grep -q '"state":"faulted"' || fail "stopped replica not faulted: $(vol_status bench)"
  stop_ublkd 60 || fail "owner did not stop"

  . "$T/repl.env"
  for base in mdraid1:$MDRAID1_ENV mdraid1nvme:$NVMETCP_ENV; do
    b=${base%%:*} env=${base#*:}
    if [ -f "$env" ]; then
      . "$env"
      case $b in mdraid1) suffix=mdraid1 ;; *) suffix=mdraid1_nvmetcp ;; esac
      for n in randwrite_qd32 randwrite_qd1 randread_qd32 randread_qd1; do
        for t in 2way 3way; do
          eval "u=\$repl_${t}_${n}_iops m=\$${b}_${n}_iops"
          echo "RESULT ratio_${t}_vs_${suffix}_${n}=$(awk -v u="$u" -v m="$m" 'BEGIN { printf "%.2f", u / m }')"
        done
      done
    else
      echo "$b did not run in this boot: no ratios against it"
    fi
  done
  for n in randwrite_qd32 randread_qd32; do
    eval "a=\$repl_1local_${n}_iops b=\$repl_2way_${n}_iops c=\$repl_3way_${n}_iops"
    echo "RESULT ratio_2way_vs_1local_${n}=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", b / a }')"
    echo "RESULT ratio_3way_vs_1local_${n}=$(awk -v a="$a" -v c="$c" 'BEGIN { printf "%.2f", c / a }')"
  done
  kill -TERM "$SRV_2" "$SRV_3"
  wait_pid "$SRV_2" 20; wait_pid "$SRV_3" 20
  run "$UMOUNT" /mnt/srv2
  run "$UMOUNT" /mnt/srv3
}

# ---------------------------------------------------------------------------------------------
# bench_costs: the same volume, alternately served by ublkd and by a cost-model build, 5
# rounds each (alternating, so the emulator's slow drift hits both alike); the ratio of the
# medians. Frames: 1 local + 1 remote (owner and server both the build under test), 4k
# randwrite QD32. Range table: 1 local replica on tmpfs (nothing but CPU per request, where a
# per-request cost shows most), 4k randwrite QD32.
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

cost_round() { # BIN TAG REPLICAS: one 4k randwrite QD32 run; prints "IOPS CPU_US_PER_IO"
  UBLKD_BIN=$1 repl_owner "$2" "$3" >&2
  set -- $(ticks_of "$DPID") $(fio_run /dev/ublkb0 randwrite 4k 32 "cost_$2") $(ticks_of "$DPID")
  u_iops=$3
  echo "$3 $(per_io $(($6 + $7 - $1 - $2)))"
  stop_ublkd 60 >&2 || fail "owner did not stop"
}

# alternate WHAT LABEL ROUND BIN_A BIN_B: BENCH_ROUNDS (5) rounds of `ROUND BIN_A` then
# `ROUND BIN_B` (each prints IOPS and the owner's CPU µs per request); the lists in ALT_A,
# ALT_B (IOPS) and CPU_A, CPU_B.
alternate() {
  ALT_A="" ALT_B="" CPU_A="" CPU_B=""
  for r in $(seq 1 "${BENCH_ROUNDS:-5}"); do
    for side in A B; do
      if [ $side = A ]; then bin=$4; else bin=$5; fi
      set -- "$1" "$2" "$3" "$4" "$5" $($3 "$bin")
      iops=$6 cpu=$7
      [ -n "$iops" ] && [ "$iops" -gt 0 ] || fail "$1 round $r ($bin): no IOPS (see $T/ublkd.log)"
      echo "TABLE costs $1 $(basename "$bin") round $r: $iops IOPS, owner cpu/io $cpu us ($2)"
      eval "ALT_$side=\"\$ALT_$side $iops\" CPU_$side=\"\$CPU_$side $cpu\""
      set -- "$1" "$2" "$3" "$4" "$5"
    done
  done
}

bench_costs() {
  need_ublk
  crc=/usr/local/bin/ublkd-bench-crc-frames
  unordered=/usr/local/bin/ublkd-bench-unordered
  [ -x $crc ] && [ -x $unordered ] || fail "cost-model builds missing from the initramfs"
  set -- $VM_DISKS
  [ $# -ge 4 ] || fail "need 4 virtio disks, have: $VM_DISKS"
  local_disk=$3
  run "$MKFS_EXT4" -q -F "$4"
  mkdir -p /mnt/srv2
  run "$MOUNT" "$4" /mnt/srv2
  cluster_secret
  L="{ local = \"$local_disk\" }"
  R2="{ remote = \"127.0.0.2:7450\", id = \"cost\" }"
  # Prefill once (the same replicas serve every round).
  LOG_LEVEL=warn replica_server 2 /mnt/srv2
  wipe_label "$local_disk"
  repl_owner fill "$L, $R2"
  prefill
  stop_ublkd 60 || fail "owner did not stop"
  kill -TERM "$SRV_2"; wait_pid "$SRV_2" 20
  # Each server restart runs the build under test on both ends.
  frames_round() {
    UBLKD_BIN=$1 LOG_LEVEL=warn replica_server 2 /mnt/srv2 >&2
    cost_round "$1" fill "$L, $R2"
    kill -TERM "$SRV_2"; wait_pid "$SRV_2" 20 >&2
  }
  alternate frames "2-way randwrite QD32" frames_round "$UBLKD" "$crc"
  v2=$ALT_A v1=$ALT_B
  m2=$(median $v2) m1=$(median $v1)
  echo "RESULT costs_frames_v2_randwrite_qd32_iops=$m2"
  echo "RESULT costs_frames_v1crc_randwrite_qd32_iops=$m1"
  echo "RESULT ratio_v2_vs_v1_frames_randwrite_qd32=$(awk -v a="$m2" -v b="$m1" 'BEGIN { printf "%.3f", a / b }')"
  echo "RESULT costs_frames_v2_owner_cpu_us_per_io=$(median $CPU_A)"
  echo "RESULT costs_frames_v1crc_owner_cpu_us_per_io=$(median $CPU_B)"
  run "$UMOUNT" /mnt/srv2

  mkdir -p /tmp/cost
  LT="{ local = \"/tmp/cost/r.img\" }"
  repl_owner tfill "$LT"
  prefill
  stop_ublkd 60 || fail "owner did not stop"
  ranges_round() { cost_round "$1" tfill "$LT"; }
  alternate ranges "tmpfs randwrite QD32" ranges_round "$UBLKD" "$unordered"
  o=$ALT_A u=$ALT_B
  mo=$(median $o) mu=$(median $u)
  echo "RESULT costs_ranges_ordered_randwrite_qd32_iops=$mo"
  echo "RESULT costs_ranges_unordered_randwrite_qd32_iops=$mu"
  echo "RESULT ratio_ordered_vs_unordered_randwrite_qd32=$(awk -v a="$mo" -v b="$mu" 'BEGIN { printf "%.3f", a / b }')"
  echo "RESULT costs_ranges_ordered_owner_cpu_us_per_io=$(median $CPU_A)"
  echo "RESULT costs_ranges_unordered_owner_cpu_us_per_io=$(median $CPU_B)"
  rm -rf /tmp/cost
}

# ---------------------------------------------------------------------------------------------
# bench_rebuild (see the header).

# last_rebuild FIELD: a number field of the newest rebuild history entry of volume bench.
last_rebuild() {
  "$UBLKCTL" --socket "$SOCK" --output json rebuild history bench | tr -d ' \n' \
    | sed 's/.*},{/{/' | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"
}

# all_online N: volume bench has N replicas, every one online.
all_online() {
  _st=$(vol_status bench | json_replicas)
  [ "$(echo "$_st" | grep -c '"state":')" -eq "$1" ] \
    && [ "$(echo "$_st" | grep -c '"state":"online"')" -eq "$1" ]
}

# rebuild_done: bytes the running rebuild of volume bench has copied (0 when none runs).
rebuild_done() {
  _d=$(vol_status bench | tr -d ' \n' | sed -n 's/.*"rebuild":{[^}]*"done":\([0-9]*\).*/\1/p')
  echo "${_d:-0}"
}

# rebuilt N: the rebuild history has N entries and no rebuild runs.
rebuilt() {
  [ "$("$UBLKCTL" --socket "$SOCK" --output json rebuild history bench | grep -o started_unix_ms | wc -l)" -ge "$1" ] \
    && ! vol_status bench | grep -q '"rebuild":{'
}

# add_replica TAG REPLICA: append REPLICA to the owner's config and reload it.
add_replica() {
  sed -i "s|^replicas = \[ \(.*\) \]|replicas = [ \1, $2 ]|" "$T/$1.conf"
  "$UBLKCTL" --socket "$SOCK" reload || fail "reload: $(tail -n 3 "$T/ublkd.log")"
}

bench_rebuild() {
  need_ublk
  repl_disks
  # Each part starts with empty servers: a 1 GiB disk holds one filled 512 MiB image, not two.
  stop_server() { # I: server I stopped, if it runs
    pid=$(eval echo "\${SRV_$1:-}")
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait_pid "$pid" 20
  }
  fresh_servers() {
    for i in 2 3; do
      stop_server $i
      rm -f /mnt/srv$i/*.img
      LOG_LEVEL=warn replica_server $i /mnt/srv$i
    done
  }
  fresh_servers
  L="{ local = \"$local_disk\" }"
  R2() { echo "{ remote = \"127.0.0.2:7450\", id = \"$1\" }"; }
  R3() { echo "{ remote = \"127.0.0.3:7450\", id = \"$1\" }"; }
  size=$((512 << 20))

  # A deadline for throughput, not for stall measurements: under TCG a server's write can
  # stall for over 2 s while its filesystem commits (seen once in the QoS part's idle run).
  _timeout=$REPL_TIMEOUT_MS REPL_TIMEOUT_MS=10000
  # BENCH_REBUILD_PARTS: which parts run, comma-separated (the harness passes plain words
  # only), e.g. full,partial; default all four.
  parts=" $(echo "${BENCH_REBUILD_PARTS:-full,partial,qos,log}" | tr ',' ' ') "
  part() { case "$parts" in *" $1 "*) return 0 ;; *) say "bench_rebuild: part $1 skipped"; return 1 ;; esac; }

  # 1. Full rebuild, uncapped, of the whole (written) volume onto a new replica on server 3
  #    (source: the local disk), against the same bytes copied local disk -> TCP -> a file on
  #    server 3's filesystem, O_DIRECT at both ends. Then the same rebuild by the cost-model
  #    build bench-cheap-payload-tag (owner and servers; payload tags over 64 bytes, i.e. no
  #    bulk MAC): what the MAC costs, measured rather than inferred from a profile.
  if part full; then
  # full_rebuild TAG: fill a volume of the local disk and server 2 with ${UBLKD_BIN:-ublkd},
  # add a replica on server 3; sets rb (MiB/s of its rebuild).
  full_rebuild() {
    fresh_servers
    TAG=$1; wipe_label "$local_disk"; REBUILD_RATE=0 repl_owner $TAG "$L, $(R2 ${TAG}2)"
    prefill 512M
    add_replica $TAG "$(R3 ${TAG}3)"
    wait_for 900 rebuilt 1 || fail "full rebuild ($TAG) did not finish: $(vol_status bench)"
    bytes=$(last_rebuild bytes); t0=$(last_rebuild started_unix_ms); t1=$(last_rebuild ended_unix_ms)
    [ "$bytes" = "$size" ] || fail "full rebuild ($TAG) copied $bytes bytes, not $size"
    rb=$(awk -v b="$bytes" -v ms=$((t1 - t0)) 'BEGIN { printf "%.1f", b / 1048576 / (ms / 1000) }')
    stop_ublkd 60 || fail "owner did not stop"
  }
  full_rebuild full
  rb_real=$rb
  UBLKD_BIN=/usr/local/bin/ublkd-bench-cheap-payload-tag
  full_rebuild fullcheap
  rb_cheap=$rb
  unset UBLKD_BIN
  fresh_servers
  # The copy: local disk -> dd -> /dev/nbd0 -> TCP -> qemu-nbd -> a file on server 3's
  # filesystem (the path a rebuild's target writes take), 1 MiB at a time, O_DIRECT. The
  # rebuilt replica's image goes first: the 1 GiB disk holds one 512 MiB image, not two.
  kill -TERM "$SRV_3"; wait_pid "$SRV_3" 20
  rm -f /mnt/srv3/*.img
  run truncate -s 512M /mnt/srv3/copy.img
  "$QEMU_NBD" -f raw --cache=none --aio=io_uring --discard=ignore --detect-zeroes=off \
    -x copy -b 127.0.0.3 -p $NBD_PORT -t /mnt/srv3/copy.img > "$T/qemu-nbd.log" 2>&1 &
  nbd_srv=$!
  wait_for 20 tcp_listening 127.0.0.3 $NBD_PORT || fail "qemu-nbd: $(head -c 300 "$T/qemu-nbd.log")"
  run "$NBD_CLIENT" 127.0.0.3 $NBD_PORT /dev/nbd0 -N copy
  wait_dev /dev/nbd0
  c0=$(now)
  run dd if="$local_disk" of=/dev/nbd0 bs=1M count=512 iflag=direct oflag=direct conv=fsync
  c1=$(now)
  run "$NBD_CLIENT" -d /dev/nbd0
  kill -TERM "$nbd_srv"; wait_pid "$nbd_srv" 10
  cp_rate=$(awk -v b=$size -v t0="$c0" -v t1="$c1" 'BEGIN { printf "%.1f", b / 1048576 / (t1 - t0) }')
  rm -f /mnt/srv3/copy.img
  echo "TABLE rebuild full: $rb_real MiB/s (uncapped; $rb_cheap MiB/s without the bulk MAC, a cost model); raw TCP copy of the same bytes: $cp_rate MiB/s"
  echo "RESULT full_rebuild_mibps=$rb_real"
  echo "RESULT full_rebuild_cheap_payload_tag_mibps=$rb_cheap"
  echo "RESULT raw_tcp_copy_mibps=$cp_rate"
  echo "RESULT ratio_full_rebuild_vs_copy=$(awk -v a="$rb_real" -v b="$cp_rate" 'BEGIN { printf "%.2f", a / b }')"
  echo "RESULT ratio_full_rebuild_cheap_payload_tag_vs_copy=$(awk -v a="$rb_cheap" -v b="$cp_rate" 'BEGIN { printf "%.2f", a / b }')"
  fi

  # 2. Partial rebuild: server 3 is killed, 100 blocks of 4 KiB are written in 100 distinct
  #    64 KiB regions, the server comes back: the bytes copied against the regions dirtied.
  if part partial; then
  fresh_servers
  TAG=partial; wipe_label "$local_disk"; repl_owner $TAG "$L, $(R2 p2), $(R3 p3)"
  run dd if=/dev/urandom of=/dev/ublkb0 bs=1M count=64 oflag=direct conv=fsync
  kill -KILL "$SRV_3"; wait "$SRV_3" 2>/dev/null
  for i in $(seq 0 99); do
    dd if=/dev/urandom of=/dev/ublkb0 bs=4k count=1 seek=$(( (i * 37 % 8192) * 16 )) oflag=direct 2>/dev/null
  done
  LOG_LEVEL=warn replica_server 3 /mnt/srv3
  wait_for 300 rebuilt 1 || fail "partial rebuild did not finish: $(vol_status bench)"
  bytes=$(last_rebuild bytes)
  echo "TABLE rebuild partial: $bytes bytes copied for 100 dirtied 64 KiB regions"
  echo "RESULT partial_rebuild_bytes=$bytes"
  echo "RESULT ratio_partial_bytes_vs_dirty=$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / (100 * 65536) }')"
  stop_ublkd 60 || fail "owner did not stop"
  fi

  # 3. Application 4k randwrite QD32 while a full rebuild of a third replica runs at the
  #    default limits, against the same three replicas once it is done (and, for the record,
  #    the two before it was added).
  if part qos; then
  fresh_servers
  TAG=qos; wipe_label "$local_disk"; repl_owner $TAG "$L, $(R2 q2)"
  prefill 512M
  # Both replicas must take the writes, or "idle" measures a degraded volume.
  all_online 2 || fail "a replica is not online after the fill: $(vol_status bench)"
  set -- $(fio_run /dev/ublkb0 randwrite 4k 32 qos_idle)
  idle=$1
  all_online 2 || fail "a replica left during the idle run: $(vol_status bench)"
  add_replica $TAG "$(R3 q3)"
  d0=$(rebuild_done)
  set -- $(fio_run /dev/ublkb0 randwrite 4k 32 qos_busy)
  busy=$1 d1=$(rebuild_done)
  vol_status bench | grep -q '"rebuild":{' \
    || echo "TABLE qos: the rebuild ended before fio did (the ratio covers part of the run)"
  vol_status bench | json_replicas | grep -q '"state":"faulted"' \
    && fail "a replica faulted during the busy run: $(vol_status bench)"
  wait_for 900 rebuilt 1 || fail "capped rebuild did not finish: $(vol_status bench)"
  # Without a rebuild, the same three replicas: what the rebuild itself costs (the
  # third replica's writes are the volume's from now on, rebuild or not).
  all_online 3 || fail "not three replicas online after the rebuild: $(vol_status bench)"
  set -- $(fio_run /dev/ublkb0 randwrite 4k 32 qos_after)
  after=$1
  echo "TABLE rebuild qos: app 4k randwrite QD32 $busy IOPS during a rebuild at the default limits ([rebuild] rate and busy_percent; $(( (d1 - d0) >> 20 )) MiB copied meanwhile), $after IOPS on the same three replicas without one; $idle IOPS on the two before the third was added"
  echo "RESULT app_randwrite_qd32_iops_two_replicas=$idle"
  echo "RESULT app_randwrite_qd32_iops_during_rebuild=$busy"
  echo "RESULT app_randwrite_qd32_iops_three_replicas=$after"
  echo "RESULT rebuild_mib_copied_during_fio=$(( (d1 - d0) >> 20 ))"
  echo "RESULT rebuild_app_iops_ratio=$(awk -v a="$busy" -v b="$after" 'BEGIN { printf "%.2f", a / b }')"
  echo "RESULT rebuild_app_iops_ratio_vs_two_replicas=$(awk -v a="$busy" -v b="$idle" 'BEGIN { printf "%.2f", a / b }')"
  stop_ublkd 60 || fail "owner did not stop"
  fi

  # 4. The dirty log on a degraded volume: its remote replica killed, 4k randwrite QD32,
  #    with this build and with the bench-no-dirty-log one, 5 rounds, each round both builds
  #    back to back in alternating order (ABBA: drift hits both alike). The ratio is the
  #    median of the 5 rounds' ratios; the owner's CPU per write is the steadier figure (a
  #    run's IOPS spread by ±40 % under TCG).
  if part log; then
  nolog=/usr/local/bin/ublkd-bench-no-dirty-log
  [ -x "$nolog" ] || fail "missing $nolog"
  kill -TERM "$SRV_3"; wait_pid "$SRV_3" 20
  rm -f /mnt/srv3/*.img
  _r=0 A="" B="" CA="" CB="" R=""
  log_run() { # BIN: one degraded run; sets iops and cpu (µs of owner CPU per write)
    _r=$((_r + 1))
    LOG_LEVEL=warn replica_server 3 /mnt/srv3
    TAG=log$_r; wipe_label "$local_disk"
    UBLKD_BIN=$1 repl_owner $TAG "$L, $(R3 d$_r)"
    kill -KILL "$SRV_3"; wait "$SRV_3" 2>/dev/null
    wait_for 20 eval 'vol_status bench | grep -q "\"state\":\"faulted\""' \
      || fail "replica not faulted: $(vol_status bench)"
    set -- $(ticks_of "$DPID") $(fio_run /dev/ublkb0 randwrite 4k 32 "log_$_r") $(ticks_of "$DPID")
    iops=$3 u_iops=$3
    cpu=$(per_io $(($6 + $7 - $1 - $2)))
    stop_ublkd 60 || fail "owner did not stop"
  }
  for r in 1 2 3 4 5; do
    if [ $((r % 2)) = 1 ]; then order="$UBLKD $nolog"; else order="$nolog $UBLKD"; fi
    for bin in $order; do
      log_run "$bin"
      if [ "$bin" = "$UBLKD" ]; then A="$A $iops" CA="$CA $cpu" a1=$iops
      else B="$B $iops" CB="$CB $cpu" b1=$iops; fi
    done
    R="$R $(awk -v a="$a1" -v b="$b1" 'BEGIN { printf "%.3f", a / b }')"
  done
  a=$(median $A) b=$(median $B) ca=$(median $CA) cb=$(median $CB)
  echo "TABLE rebuild dirty log: degraded 4k randwrite QD32 with the log$A IOPS (owner CPU$CA us/write), without$B IOPS ($CB us/write); per-round ratios$R"
  echo "RESULT degraded_randwrite_qd32_iops_log=$a"
  echo "RESULT degraded_randwrite_qd32_iops_nolog=$b"
  echo "RESULT degraded_owner_cpu_us_per_write_log=$ca"
  echo "RESULT degraded_owner_cpu_us_per_write_nolog=$cb"
  echo "RESULT ratio_dirty_log_vs_none=$(median $R | awk '{ printf "%.2f", $1 }')"
  echo "RESULT ratio_dirty_log_cpu_nolog_vs_log=$(awk -v a="$ca" -v b="$cb" 'BEGIN { printf "%.2f", b / a }')"
  fi
  stop_server 2; stop_server 3
  REPL_TIMEOUT_MS=$_timeout
  run "$UMOUNT" /mnt/srv2
  run "$UMOUNT" /mnt/srv3
}

bench_ha() {
  need_ublk
  set -- $VM_DISKS
  [ $# -ge 4 ] || fail "need 4 virtio disks, have: $VM_DISKS"
  i=1
  for d in "$1" "$2" "$3" "$4"; do
    run "$MKFS_EXT4" -q -F "$d"; mkdir -p /mnt/ha$i; run "$MOUNT" "$d" /mnt/ha$i; i=$((i + 1))
  done
  cluster_secret
  for i in 2 3 4; do LOG_LEVEL=warn replica_server $i /mnt/ha$i; done
  VOL_SIZE=1GiB VOL_EXTRA='spares = [ "127.0.0.4:7450" ]' repl_owner ha \
    '{ local = "/mnt/ha1/bench.img" }, { remote = "127.0.0.2:7450", id = "ha-b" }, { remote = "127.0.0.3:7450", id = "ha-c" }'
  prefill 512M
  "$FIO" --name=ha --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=8 --size=512M --time_based --runtime=30 --norandommap --randrepeat=0 \
    --minimal > "$T/ha.terse" 2> "$T/ha.err" &
  _f=$!
  sleep 5
  t0=$(now)
  kill -KILL "$SRV_3"
  has_new() { vol_status bench | json_replicas | grep -q 'ha-c@127.0.0.4:7450'; }
  wait_for 120 has_new || fail "no replacement: $(vol_status bench)"
  t1=$(now)
  say "replacement taking writes; fio runs on for the rest of its 30 s, then the volume idles"
  wait $_f || fail "fio failed: $(head -c 300 "$T/ha.err")"
  restored() {
    _st=$(vol_status bench)
    # (The substitution names the dead replica too: look at the replica list only.)
    ! echo "$_st" | json_replicas | grep -q 'ha-c@127.0.0.3' \
      && [ "$(echo "$_st" | json_replicas | grep -c '"state":"online"')" -eq 3 ]
  }
  wait_for 700 restored || fail "redundancy not restored: $(vol_status bench)"
  t2=$(now)
  ms=$(awk -F';' '{ if ($5 != 0) exit 1; printf "%d\n", $80 / 1000 }' "$T/ha.terse") || fail "fio reported errors"
  iops=$(awk -F';' '{ printf "%d\n", $49 }' "$T/ha.terse")
  sw=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  rs=$(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
  echo "TABLE ha: replacement taking writes ${sw} s after the SIGKILL (grace 5 s), all replicas online after ${rs} s (1 GiB volume, 512 MiB written; fio 4k randwrite QD8 for the first 25 s, then idle), worst 4k write latency ${ms} ms, ${iops} IOPS over those 30 s"
  echo "RESULT replace_after_peer_death_s=$sw"
  echo "RESULT redundancy_restored_s=$rs"
  echo "RESULT ha_worst_write_latency_ms=$ms"
  "$UBLKCTL" --socket "$SOCK" verify bench > "$T/verify.out" 2>&1 || fail "verify: $(cat "$T/verify.out")"
  stop_ublkd 60 || fail "owner did not stop"
  for i in 2 4; do kill -TERM "$(eval echo \$SRV_$i)"; wait_pid "$(eval echo \$SRV_$i)" 20; done
  for i in 1 2 3 4; do run "$UMOUNT" /mnt/ha$i; done
}

# ---------------------------------------------------------------------------------------------
# bench_snapshot (see the header).
snap_ctl() { "$UBLKCTL" --socket "$SOCK" "$@"; }
# snap_create VOL NAME: prints "took_ms paused_us" (the daemon's own clock: the guest's date
# has no sub-second field); on failure the error on stderr, status 1 (it runs in a command
# substitution: the caller fails the scenario).
snap_create() {
  _j=$(snap_ctl -o json snapshot create "$1" "$2") || { echo "snapshot create $1 $2: $_j" >&2; return 1; }
  _p=$(printf '%s\n' "$_j" | awk -F'[:,]' '/"paused_us"/ { gsub(/ /, "", $2); print $2 }')
  _t=$(printf '%s\n' "$_j" | awk -F'[:,]' '/"took_us"/ { gsub(/ /, "", $2); print $2 }')
  awk -v t="${_t:-0}" -v p="${_p:-0}" 'BEGIN { printf "%.1f %d\n", t / 1000, p }'
}
# one_pass DEV NAME: one pass of 4k random writes over REGION, each block once; prints IOPS.
one_pass() {
  "$FIO" --name="$2" --filename="$1" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --size=$REGION --randrepeat=0 --minimal > "$T/$2.terse" 2> "$T/$2.err" \
    || fail "fio $2: $(head -c 300 "$T/$2.err")"
  awk -F';' '{print $49}' "$T/$2.terse"
}
# maxlat_run DEV NAME SNAPS: fio 4k randwrite QD8 for 12 s, SNAPS snapshots taken 3 s apart
# from 3 s in; prints the worst write latency in ms.
maxlat_run() {
  "$FIO" --name="$2" --filename="$1" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=8 --size=$REGION --time_based --runtime=12 --norandommap --randrepeat=0 \
    --minimal > "$T/$2.terse" 2> "$T/$2.err" &
  _f=$!
  _i=0
  while [ $_i -lt "$3" ]; do
    sleep 3; _i=$((_i + 1))
    snap_create snap "$2-$_i" > /dev/null 2>> "$T/create.err" || echo "snapshot $2-$_i failed" >> "$T/create.err"
  done
  wait $_f || fail "fio $2: $(head -c 300 "$T/$2.err")"
  awk -F';' '{printf "%.1f", $80 / 1000}' "$T/$2.terse"
}
bench_snapshot() {
  need_ublk
  set -- $VM_DISKS
  [ $# -ge 1 ] || fail "need a virtio disk, have: $VM_DISKS"
  run "$MKFS_EXT4" -F -q "$1"
  mkdir -p /mnt/bsnap
  run "$MOUNT" -t ext4 "$1" /mnt/bsnap
  LOG_LEVEL=warn QUEUES=1 DEPTH=128 mkconf "$T/ublkd.conf" flat 1GiB /mnt/bsnap/flat.img
  for v in "snap 1GiB 1" "big 16GiB 2"; do
    set -- $v
    printf '\n[[volume]]\nname = "%s"\nsize = "%s"\nblock_size = 4096\nqueues = 1\ndepth = 128\ndevice_id = %s\nreplicas = [ { local = "/mnt/bsnap/%s.img" } ]\n' \
      "$1" "$2" "$3" "$1" >> "$T/ublkd.conf"
  done
  cp "$T/ublkd.conf" "$T/last.conf"
  start_ublkd "$T/ublkd.conf"
  wait_dev /dev/ublkb0; wait_dev /dev/ublkb1; wait_dev /dev/ublkb2
  for d in /dev/ublkb0 /dev/ublkb1; do
    run "$FIO" --name=fill --filename=$d --ioengine=io_uring --direct=1 --rw=write --bs=1M \
      --iodepth=4 --size=$REGION --output=/dev/null
  done
  # Fragment: scattered 4k writes all over each volume.
  for d in /dev/ublkb1 /dev/ublkb2; do
    run "$FIO" --name=frag --filename=$d --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
      --iodepth=32 --time_based --runtime=15 --norandommap --randrepeat=0 --output=/dev/null
  done
  for v in "snap 1g" "big 16g"; do
    vol=${v% *} tag=${v#* }
    walls="" paused=""
    for i in 1 2 3 4 5; do
      r=$(snap_create "$vol" "t$i" 2> "$T/create.err") || fail "$(cat "$T/create.err")"
      walls="$walls ${r% *}" paused="$paused ${r#* }"
    done
    w=$(median $walls) p=$(median $paused)
    echo "RESULT snapshot_create_ms_$tag=$w"
    echo "RESULT snapshot_paused_us_$tag=$p"
    printf 'TABLE snapshot create %-4s wall %s ms (runs:%s), writes held %s us (runs:%s)\n' "$tag" "$w" "$walls" "$p" "$paused"
  done
  : > "$T/create.err"
  base=$(maxlat_run /dev/ublkb1 lat-base 0)
  during=$(maxlat_run /dev/ublkb1 lat-snap 3)
  [ ! -s "$T/create.err" ] || fail "$(cat "$T/create.err")"
  echo "RESULT snapshot_maxlat_base_ms=$base"
  echo "RESULT snapshot_maxlat_create_ms=$during"
  # Two more, with writes between: 10 snapshots, each layer with its own blocks.
  for i in 9 10; do
    run "$FIO" --name=between --filename=/dev/ublkb1 --ioengine=io_uring --direct=1 --rw=randwrite \
      --bs=4k --iodepth=32 --size=$REGION --time_based --runtime=3 --norandommap --randrepeat=0 --output=/dev/null
    snap_create snap "s$i" > /dev/null || fail "snapshot s$i"
  done
  n=$(snap_ctl -o json snapshot list snap | grep -c '"uuid"')
  [ "$n" = 10 ] || fail "snap has $n snapshots, expected 10"
  # Reads of blocks spread over the layers, then writes, each against flat back to back.
  set -- $(fio_run /dev/ublkb0 randread 4k 32 flat_randread) $(fio_run /dev/ublkb1 randread 4k 32 snap_randread)
  echo "RESULT ratio_layered_vs_plain_randread=$(awk -v a="$1" -v b="$4" 'BEGIN { printf "%.2f", b / a }')"
  printf 'TABLE randread qd32  flat %s IOPS  10 snapshots %s IOPS\n' "$1" "$4"
  # The first pass after a snapshot: every write lands on a block only older layers have.
  snap_create snap first > /dev/null || fail "snapshot first"
  f=$(one_pass /dev/ublkb0 flat_pass) l=$(one_pass /dev/ublkb1 snap_pass)
  echo "RESULT ratio_first_write_vs_plain=$(awk -v a="$f" -v b="$l" 'BEGIN { printf "%.2f", b / a }')"
  printf 'TABLE first pass   flat %s IOPS  after a snapshot %s IOPS\n' "$f" "$l"
  # Steady state: the head now holds every block of the region.
  set -- $(fio_run /dev/ublkb0 randwrite 4k 32 flat_randwrite) $(fio_run /dev/ublkb1 randwrite 4k 32 snap_randwrite)
  echo "RESULT ratio_layered_vs_plain_randwrite=$(awk -v a="$1" -v b="$4" 'BEGIN { printf "%.2f", b / a }')"
  printf 'TABLE randwrite qd32 flat %s IOPS  11 snapshots %s IOPS\n' "$1" "$4"
  # Export: snapshot `first` of `snap` (1 GiB) to a raw file on ext4 on disk 2, against dd
  # copying the device itself to the same filesystem (both read 1 GiB from disk 1).
  set -- $VM_DISKS
  run "$MKFS_EXT4" -F -q "$2"
  mkdir -p /mnt/bexp
  run "$MOUNT" -t ext4 "$2" /mnt/bexp
  _j=$(snap_ctl -o json snapshot export snap first /mnt/bexp/first.raw) || fail "export: $_j"
  ems=$(printf '%s\n' "$_j" | awk -F'[:,]' '/"millis"/ { gsub(/ /, "", $2); print $2 }')
  run sync
  rm -f /mnt/bexp/first.raw
  # Timed by /proc/uptime (1/100 s): busybox's date and dd print no sub-second time.
  _t0=$(cut -d' ' -f1 /proc/uptime)
  dd if=/dev/ublkb1 of=/mnt/bexp/dd.raw bs=1M iflag=direct conv=fsync 2> "$T/dd.err" \
    || fail "dd: $(cat "$T/dd.err")"
  _t1=$(cut -d' ' -f1 /proc/uptime)
  dsec=$(awk -v a="$_t0" -v b="$_t1" 'BEGIN { printf "%.2f", b - a }')
  [ -n "$ems" ] && [ -n "$dsec" ] || fail "no export time ($ems) or dd time ($dsec)"
  emib=$(awk -v ms="$ems" 'BEGIN { printf "%.1f", 1024 / (ms / 1000) }')
  dmib=$(awk -v s="$dsec" 'BEGIN { printf "%.1f", 1024 / s }')
  echo "RESULT snapshot_export_mib_s=$emib"
  echo "RESULT dd_device_mib_s=$dmib"
  echo "RESULT ratio_export_vs_dd=$(awk -v a="$dmib" -v b="$emib" 'BEGIN { printf "%.2f", b / a }')"
  printf 'TABLE export 1 GiB  %s MiB/s   dd of the device %s MiB/s\n' "$emib" "$dmib"
  rm -f /mnt/bexp/dd.raw
  run "$UMOUNT" /mnt/bexp
  stop_ublkd 60 || fail "ublkd did not stop cleanly"
  run "$UMOUNT" /mnt/bsnap
}
