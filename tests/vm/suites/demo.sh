# timeout: 600
#
# The README's main job inside the VM, for hosts without ublk: serve the volume of the shipped
# ublk.toml.example exactly as it is, put ext4 on it, use it, and show what ublkctl reports.

SCENARIOS="example_volume"
timeout_example_volume=400

example_volume() {
  need_ublk
  conf=/etc/ublkd/ublk.toml.example
  [ -f $conf ] || fail "$conf missing from the initramfs"
  run "$UBLKD" check-config $conf
  cp $conf "$T/last.conf"
  start_ublkd $conf
  wait_dev /dev/ublkb0 60
  wait_live vol0 60
  run "$MKFS_EXT4" -q /dev/ublkb0
  mkdir -p /mnt/vol0
  run "$MOUNT" /dev/ublkb0 /mnt/vol0
  run dd if=/dev/urandom of=/mnt/vol0/data bs=1M count=32 conv=fsync
  sum=$(sha256sum < /mnt/vol0/data)
  df -h /mnt/vol0
  umount_checked /mnt/vol0 /dev/ublkb0
  drop_caches
  run "$MOUNT" /dev/ublkb0 /mnt/vol0
  [ "$(sha256sum < /mnt/vol0/data)" = "$sum" ] || fail "data changed across remount"
  umount_checked /mnt/vol0 /dev/ublkb0
  fsck_clean /dev/ublkb0
  run "$UBLKCTL" --config $conf list
  run "$UBLKCTL" --config $conf status vol0
  # Both replicas are full mirrors: identical data (each keeps its own label after it).
  size=$("$UBLKCTL" --config $conf status vol0 --output json | tr -d ' \t\r\n' | json_top_field size)
  [ -n "$size" ] && [ "$size" -gt 0 ] || fail "no volume size in the status"
  cmp -s -n "$size" /var/lib/ublkd/vol0-a.img /var/lib/ublkd/vol0-b.img \
    || fail "replicas differ after a clean run"
  say "replicas identical over the volume's $size bytes"
  stop_ublkd 60 || fail "ublkd did not stop cleanly"
  no_kernel_errors ublkb0
}
