# disks: 3 size=1G
# boots: 3
# timeout: 600
#
# Power loss, for real: the guest is reset (`power_cut`: sysrq b, no sync, no unmount) and
# booted again on the same disks. One owner and two replica servers in the guest, each on a
# virtio disk of its own with ext4 on it: the owner's local replica, state dir and configs on
# vda, the servers' replicas and state dirs on vdb and vdc. The cut takes owner and replica
# hosts down together (a rack's power), and what none of them had sent to its disk is gone.
#
#   boot 1  ext4 on /dev/ublkb0; files written and synced (their sums kept on vda); then fio
#           writes scattered blocks into a file, with fsyncs, and the power goes mid-write.
#   boot 2  everything starts again from its disks: the owner finds the unclean shutdown and
#           resyncs the activity log's regions (slowly: [rebuild] rate = 1MiB); meanwhile the
#           filesystem is mounted (its journal replays) and more files are written and
#           synced; the power goes again, mid-resync.
#   boot 3  the resync covering both crashes finishes; verify finds the replicas identical,
#           every synced file reads back, e2fsck is clean, and after a clean stop the three
#           replica images are byte-identical.

SCENARIOS="power_cut_twice"
timeout_power_cut_twice=500

DEV=/dev/ublkb0
VOL=pv
D0=/mnt/d0
CLUSTER_KEY=$D0/cluster.key

# pl_disks: ext4 on each disk at the first boot, mounted on /mnt/d0, /mnt/d1, /mnt/d2 (after a
# cut, mounting replays their journals).
pl_disks() {
  _i=0
  for _d in $VM_DISKS; do
    [ "$BOOT" != 1 ] || run "$MKFS_EXT4" -q -F "$_d"
    mkdir -p /mnt/d$_i
    run "$MOUNT" -t ext4 "$_d" /mnt/d$_i
    _i=$((_i + 1))
  done
  [ "$_i" = 3 ] || fail "3 disks expected, got: $VM_DISKS"
}

# pl_up RATE: the replica servers of disks 1 and 2 (127.0.0.2 and .3), then the owner
# (rebuilds and resyncs at RATE); after a cut, it must have seen the unclean shutdown.
pl_up() {
  replica_server 2 /mnt/d1/replicas /mnt/d1/server
  replica_server 3 /mnt/d2/replicas /mnt/d2/server
  cat > "$D0/ublkd.toml" <<EOF
[node]
state_dir = "$D0/state"
control_socket = "$SOCK"
cluster_secret_file = "$CLUSTER_KEY"

[rebuild]
rate = "$1"

[[volume]]
name = "$VOL"
size = "256MiB"
block_size = 4096
device_id = 0
replicas = [ { local = "$D0/local.img" }, { remote = "127.0.0.2:7450", id = "pv-a" }, { remote = "127.0.0.3:7450", id = "pv-b" } ]
EOF
  cp "$D0/ublkd.toml" "$T/last.conf"
  start_ublkd "$D0/ublkd.toml"
  wait_dev $DEV 60
  [ "$BOOT" = 1 ] || wait_for 30 grep -q "unclean shutdown: resyncing" "$T/ublkd.log" \
    || fail "the owner did not see the unclean shutdown: $(tail -n 20 "$T/ublkd.log")"
}

# pl_files TAG: 6 files of 2 MiB under /mnt/r/TAG, synced, their sums on vda (synced too).
pl_files() {
  mkdir -p /mnt/r/$1
  for _n in 1 2 3 4 5 6; do
    run dd if=/dev/urandom of=/mnt/r/$1/f$_n bs=1M count=2 status=none
  done
  run sync
  (cd /mnt/r && sha256sum $1/f*) > "$D0/$1.sums.new"
  run sync
  mv "$D0/$1.sums.new" "$D0/$1.sums"
  run sync
  say "$1: 6 files synced"
}

resync_running() { ! grep -q "resync done" "$T/ublkd.log"; }

# scatter_then_cut NAME SECS [CHECK]: fio writes scattered 4-64 KiB blocks into
# /mnt/r/scatter.dat with an fsync every 16 (flushes land between them); after SECS, with fio
# still writing and CHECK (a command) still true, the power goes.
scatter_then_cut() {
  "$FIO" --name=$1 --filename=/mnt/r/scatter.dat --size=64M --rw=randwrite \
    --bsrange=4k-64k --iodepth=16 --ioengine=io_uring --direct=1 --fsync=16 \
    --time_based --runtime=600 --output="$T/$1.fio.log" &
  _fio=$!
  sleep $2
  alive $_fio || fail "fio ended before the cut: $(tail -n 20 "$T/$1.fio.log")"
  [ -z "$3" ] || $3 || fail "'$3' no longer holds at the cut"
  power_cut
}

power_cut_twice() {
  need_ublk
  pl_disks
  case $BOOT in
  1)
    cluster_secret
    pl_up 1MiB
    wait_live $VOL
    # nodiscard: a discard of the whole device would make every extent hot, and the resync
    # then covers the volume whatever the activity log kept.
    run "$MKFS_EXT4" -q -F -E nodiscard $DEV
    mkdir -p /mnt/r
    run "$MOUNT" -t ext4 $DEV /mnt/r
    pl_files boot1
    # 12 s: the layout pass (64 MiB), then random writes.
    scatter_then_cut scatter 12
    ;;
  2)
    pl_up 1MiB
    mkdir -p /mnt/r
    run "$MOUNT" -t ext4 $DEV /mnt/r
    pl_files boot2
    say "status: $(vol_status $VOL)"
    resync_running || fail "the resync ended before the second cut (make it slower)"
    scatter_then_cut scatter2 3 resync_running
    ;;
  3)
    pl_up 64MiB
    wait_for 240 eval '! resync_running' || fail "the resync did not finish: $(vol_status $VOL)"
    wait_live $VOL 120
    "$UBLKCTL" --socket "$SOCK" verify $VOL > "$T/verify.out" 2>&1 || fail "verify: $(cat "$T/verify.out")"
    grep -q "replicas identical" "$T/verify.out" || fail "verify: $(cat "$T/verify.out")"
    mkdir -p /mnt/r
    run "$MOUNT" -t ext4 $DEV /mnt/r
    for _s in boot1 boot2; do
      (cd /mnt/r && sha256sum -c "$D0/$_s.sums") > "$T/sums.out" 2>&1 \
        || fail "files synced in boot ${_s#boot} before its cut differ: $(grep -v ': OK$' "$T/sums.out" | head -n 3 | tr '\n' ' ')"
    done
    say "every synced file reads back"
    umount_checked /mnt/r $DEV
    fsck_clean $DEV
    stop_daemon_clean
    for _img in /mnt/d1/replicas/pv-a.img /mnt/d2/replicas/pv-b.img; do
      cmp -s -n $((256 << 20)) "$D0/local.img" "$_img" \
        || fail "$_img differs from the local replica: $(cmp -n $((256 << 20)) "$D0/local.img" "$_img" 2>&1 | head -n 1)"
    done
    say "the three replicas are identical"
    no_kernel_errors ublkb0
    ;;
  *) fail "no boot $BOOT in this scenario" ;;
  esac
}
