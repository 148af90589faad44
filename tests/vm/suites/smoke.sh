# disks: 1 size=256M
# timeout: 300
#
# Smoke suite: checks the VM harness itself (kernel modules, device nodes, the real tools in the
# initramfs, the extra virtio disk, the dm fixture mirror_fault relies on). Needs no working
# daemon except `binaries`, which only checks that ublkd/ublkctl start (--help).

SCENARIOS="ublk_control tools binaries virtio_disk dm_fixture loop_fio"

ublk_control() {
  grep -q '^ublk_drv ' /proc/modules || fail "ublk_drv not loaded"
  [ -c /dev/ublk-control ] || fail "/dev/ublk-control missing"
  # Open it: the control ring needs the node to be usable, not just present.
  exec 3</dev/ublk-control || fail "cannot open /dev/ublk-control"
  exec 3<&-
  for m in loop dm_mod dm_flakey virtio_blk; do
    grep -q "^$m " /proc/modules || fail "module $m not loaded"
  done
  say "io_uring_disabled=$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null)"
}

tools() {
  run "$MKFS_EXT4" -V
  run "$E2FSCK" -V
  run "$FIO" --version
  run "$LOSETUP" --version
  run "$BLOCKDEV" --version
  run "$DMSETUP" version
  run "$MOUNT" --version
  # busybox dd must do O_DIRECT (the e2e dd_pattern relies on it); tmpfs accepts O_DIRECT.
  run dd if=/dev/urandom of="$T/a" bs=4096 count=16
  run dd if="$T/a" of="$T/b" bs=4096 oflag=direct
  [ "$(sha256sum < "$T/a")" = "$(sha256sum < "$T/b")" ] || fail "dd oflag=direct copy differs"
  # fio with io_uring on a file: proves the engine and libraries work in the guest.
  run "$FIO" --name=t --filename="$T/fio.dat" --size=8M --rw=randwrite --bs=4k --ioengine=io_uring \
      --iodepth=8 --direct=1 --verify=crc32c --verify_fatal=1 --output="$T/t.fio.log"
}

binaries() {
  [ -x "$UBLKD" ] || fail "$UBLKD missing"
  [ -x "$UBLKCTL" ] || fail "$UBLKCTL missing"
  run "$UBLKD" --help
  run "$UBLKCTL" --help
}

virtio_disk() {
  [ -n "$VM_DISKS" ] || fail "no extra disks declared/attached"
  for d in $VM_DISKS; do
    [ -b "$d" ] || fail "$d missing"
    say "$d: $($BLOCKDEV --getsize64 "$d") bytes"
  done
  d=${VM_DISKS%% *}
  run dd if=/dev/urandom of="$T/p" bs=1M count=4
  run dd if="$T/p" of="$d" bs=1M seek=3 oflag=direct
  run dd if="$d" of="$T/q" bs=1M skip=3 count=4 iflag=direct
  [ "$(sha256sum < "$T/p")" = "$(sha256sum < "$T/q")" ] || fail "readback from $d differs"
}

# The fixture mirror_fault uses: dm linear over a loop device, then swapped to `error` live.
dm_fixture() {
  run truncate -s 64M "$T/back.img"
  loopdev=$("$LOSETUP" -f --show "$T/back.img") || fail "losetup failed"
  sectors=$(( 64 * 1024 * 1024 / 512 ))
  run "$DMSETUP" create t0 --table "0 $sectors linear $loopdev 0"
  dm=$(dm_dev t0) || fail "no /dev/dm-N for t0"
  say "t0 is $dm"
  run dd if=/dev/zero of="$dm" bs=4096 count=4 oflag=direct
  run "$DMSETUP" suspend t0
  run "$DMSETUP" load t0 --table "0 $sectors error"
  run "$DMSETUP" resume t0
  if dd if=/dev/zero of="$dm" bs=4096 count=1 oflag=direct 2>/dev/null; then
    fail "write to the error target succeeded"
  fi
  run "$DMSETUP" remove t0
  run "$LOSETUP" -d "$loopdev"
}

# Kernel loop device over a tmpfs file with the fio job e2e uses on ublk: checks fio/io_uring on
# a block device in the guest and gives a TCG speed reference for sizing e2e's fio jobs.
loop_fio() {
  run truncate -s 256M "$T/loop.img"
  loopdev=$("$LOSETUP" -f --show --direct-io=on "$T/loop.img") || fail "losetup failed"
  run "$FIO" --name=randwrite --filename="$loopdev" --rw=randwrite --bs=4k --iodepth=32 \
      --ioengine=io_uring --direct=1 --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --output="$T/loop.fio.log"
  grep -E 'err=|IOPS=' "$T/loop.fio.log"
  grep -q 'err= *0' "$T/loop.fio.log" || fail "fio reported errors"
  run "$LOSETUP" -d "$loopdev"
}
