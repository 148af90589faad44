# The scenarios of tests/vm/debian, run on a Debian 12 guest with systemd as PID 1 (in the
# guest: /tests/suites/debian.sh, sourced after /tests/lib.sh, whose runner and helpers it
# uses). /tests is the read-only VMTEST disk: the two .debs ($DEB_OLD, $DEB_NEW: versions
# $VER_OLD and $VER_NEW), lib.sh, this file. The scenarios build on each other, in order;
# each checks what it needs first, so a failure early does not turn into timeouts later.
#   boot 1  pkg_install       apt installs $DEB_OLD offline: files, conffile, state dir,
#                             `systemd-analyze verify`, the unit enabled and started
#           (the guest reboots)
#   boot 2  boot_started      ublkd.service active at boot, ublk_drv loaded by
#                             systemd-modules-load, /dev/ublk-control, no volume served
#           config_volume     the packaged config's example volume uncommented, `systemctl
#                             reload ublkd` (what the config's note says): /dev/ublkb0 live
#           io_restart        ext4 on /dev/ublkb0, fio randwrite with crc32c headers across
#                             `systemctl restart ublkd`; then a read pass verifies every block.
#                             The worst write completion = the stall (bench_ops' method).
#                             RESULT pkg_nofault_maxlat_ms, restart_stall_ms_pkg
#           io_upgrade        the same across `apt-get install $DEB_NEW` (an upgrade: the
#                             postinst restarts the unit). RESULT upgrade_stall_ms
#           final_verify      a file written before both survives them, umount, e2fsck -fn
#           remove_live       `apt-get remove` with the volume mounted: refused by the prerm
#                             (`ublkctl stop --all`: the device is in use), nothing changed
#           pkg_remove        `apt-get remove` with the device up, unmounted: the prerm stops
#                             the volume (no device left waiting), unit and binaries gone,
#                             config and replicas kept
#           pkg_purge         `apt-get purge`: /etc/ublkd gone, the replicas in /var/lib/ublkd kept

SCENARIOS="pkg_install boot_started config_volume io_restart io_upgrade final_verify remove_live pkg_remove pkg_purge"
# Which scenarios each boot runs; every boot but the last ends in a reboot.
boot_scenarios() {
  case $1 in
    1) echo "pkg_install" ;;
    2) echo "boot_started config_volume io_restart io_upgrade final_verify remove_live pkg_remove pkg_purge" ;;
  esac
}
timeout_pkg_install=300
timeout_io_restart=300
timeout_io_upgrade=300
timeout_remove_live=300

# The packaged binaries, not lib.sh's /usr/local/bin ones.
UBLKD=/usr/bin/ublkd
UBLKCTL=/usr/bin/ublkctl
CONF=/etc/ublkd/ublk.toml
VOL=vol0
MNT=/mnt/vol0
# The example volume's replicas (ublk.toml.example).
REPLICAS="/var/lib/ublkd/vol0-a.img /var/lib/ublkd/vol0-b.img"
# What the fio runs write to, and the file written before them that must survive them.
FIO_FILE=$MNT/fio.dat
FIO_SIZE=64M
REF=$MNT/reference
REF_SUM=/var/tmp/vmtest-reference.sha256
# The stall runs: the action comes ACTION_AT s into fio's write phase, which lasts long
# enough for the action to end inside it: a restart takes a few seconds, an upgrade ~35 s
# under TCG (apt and dpkg, slowed by fio's load).
ACTION_AT=5

# As a script would run apt: no questions, waiting for the dpkg lock rather than failing.
apt_get() {
  DEBIAN_FRONTEND=noninteractive apt-get -y -o DPkg::Lock::Timeout=120 "$@"
}

# unit_pid: ublkd.service's main pid (0 when it is not running).
unit_pid() { systemctl show -p MainPID --value ublkd.service; }
unit_active() { systemctl is-active --quiet ublkd.service; }

# installed_version: the version dpkg has configured, empty if none.
installed_version() {
  dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' ublkd 2>/dev/null | awk '$1 == "ii" {print $2}'
}

# ublk_devices: the ublk character devices the kernel has (ublkc0 ...), one line.
ublk_devices() { ls /sys/class/ublk-char/ 2>/dev/null | tr '\n' ' '; }

# Scenarios leave the system to the next one (the device, the mount, the daemon are the
# point): lib.sh's cleanup would SIGINT every ublkd and unmount /mnt/*. Only what the
# scenario itself left running (fio) goes.
cleanup_scenario() {
  kill -KILL -- "-$1" 2>/dev/null && echo "cleanup: killed what $SCENARIO left running"
  return 0
}

# Diagnostics for a failed scenario: ublkd logs to the journal here.
print_diag() {
  echo "@@LOG BEGIN $SCENARIO"
  echo "--- scenario log (last 60 lines) ---"; tail -n 60 "$T/scenario.log"
  for _l in "$T"/*.fio "$T"/*.apt; do
    [ -s "$_l" ] || continue
    echo "--- $(basename "$_l") (last 30 lines) ---"; tail -n 30 "$_l"
  done
  echo "--- systemctl status ublkd ---"; systemctl status --no-pager -l ublkd.service 2>&1 | tail -n 15
  echo "--- journalctl -u ublkd (last 60 lines) ---"; journalctl -b --no-pager -u ublkd.service 2>&1 | tail -n 60
  echo "--- ublk devices: $(ublk_devices) ---"
  echo "--- dmesg since start (last 40 lines) ---"; dmesg_since_start | tail -n 40
  echo "@@LOG END $SCENARIO"
}

# debian_main: the guest's entry (/tests/main): this boot's scenarios with lib.sh's runner,
# then a reboot (the host boots the same disks again) or, after the last boot, power off.
debian_main() {
  echo "@@BOOTED $(cut -d' ' -f1 /proc/uptime) kernel $(uname -r) boot $BOOT init $(cat /proc/1/comm)"
  say "systemd: $(systemctl is-system-running 2>&1); failed units: $(systemctl list-units --failed --plain --no-legend 2>&1 | tr '\n' ' ')"
  # The whole plan once, so that a boot that never comes counts its scenarios as failed.
  [ "$BOOT" != 1 ] || echo "@@PLAN $SCENARIOS"
  for _s in $(boot_scenarios "$BOOT"); do run_one "$_s"; done
  sync
  if [ "$BOOT" -lt "$BOOTS" ]; then
    echo "@@REBOOT boot $BOOT"
    systemctl reboot
  else
    echo "@@DONE"
    systemctl poweroff
  fi
}

# --- boot 1 ----------------------------------------------------------------------------------

pkg_install() {
  [ "$(cat /proc/1/comm)" = systemd ] || fail "PID 1 is $(cat /proc/1/comm), not systemd"
  [ -z "$(installed_version)" ] || fail "ublkd is installed before the test installed it"
  say "+ apt-get install $DEB_OLD (offline)"
  apt_get install "$DEB_OLD" > "$T/install.apt" 2>&1 || fail "apt-get install $DEB_OLD exited $?: $(tail -n 3 "$T/install.apt" | tr '\n' ' ')"
  cat "$T/install.apt"
  [ "$(installed_version)" = "$VER_OLD" ] || fail "dpkg: ublkd '$(installed_version)' installed, expected $VER_OLD"
  for f in /usr/bin/ublkd /usr/bin/ublkctl; do [ -x $f ] || fail "$f missing or not executable"; done
  for f in /usr/share/man/man8/ublkd.8.gz /usr/share/man/man8/ublkctl.8.gz \
           /usr/share/man/man8/ublkctl-status.8.gz \
           /usr/share/bash-completion/completions/ublkctl \
           /usr/share/zsh/vendor-completions/_ublkctl \
           /usr/share/fish/vendor_completions.d/ublkctl.fish \
           /usr/lib/modules-load.d/ublkd.conf /usr/lib/systemd/system/ublkd.service \
           /usr/share/doc/ublkd/README.md /usr/share/doc/ublkd/examples/ublk.toml; do
    [ -s $f ] || fail "$f missing or empty"
  done
  gzip -t /usr/share/man/man8/ublkd.8.gz || fail "ublkd.8.gz is not a valid gzip file"
  dpkg-query -W -f='${Conffiles}\n' ublkd | grep -q "^ $CONF " || fail "$CONF is not a conffile: $(dpkg-query -W -f='${Conffiles}' ublkd)"
  _bad=$(dpkg --verify ublkd 2>&1)
  [ -z "$_bad" ] || fail "dpkg --verify ublkd: $_bad"
  [ -d /var/lib/ublkd ] || fail "/var/lib/ublkd missing"
  [ "$(stat -c %a /var/lib/ublkd)" = 750 ] || fail "/var/lib/ublkd has mode $(stat -c %a /var/lib/ublkd), expected 750"
  run $UBLKD check-config $CONF
  # --man=no: no man-db in the image (the pages are checked as files above).
  say "+ systemd-analyze verify --man=no ublkd.service"
  systemd-analyze verify --man=no ublkd.service > "$T/verify.out" 2>&1 || fail "systemd-analyze verify ublkd.service: $(head -n 3 "$T/verify.out" | tr '\n' ' ')"
  cat "$T/verify.out"
  ! grep -q ublkd "$T/verify.out" || fail "systemd-analyze verify warns about ublkd: $(grep ublkd "$T/verify.out" | head -n 3 | tr '\n' ' ')"
  [ "$(systemctl is-enabled ublkd.service)" = enabled ] || fail "ublkd.service is $(systemctl is-enabled ublkd.service), expected enabled"
  # The postinst starts it (and loads ublk_drv) at once: no reboot needed to use it.
  wait_for 30 unit_active || fail "ublkd.service is $(systemctl is-active ublkd.service) after the install"
  [ -c /dev/ublk-control ] || fail "/dev/ublk-control missing after the install (the postinst's modprobe)"
  wait_for 20 $UBLKCTL list || fail "ublkctl list does not answer after the install"
  run $UBLKCTL list
}

# --- boot 2 ----------------------------------------------------------------------------------

boot_started() {
  [ -n "$(installed_version)" ] || fail "ublkd is not installed (pkg_install failed?)"
  wait_for 60 unit_active || fail "ublkd.service is $(systemctl is-active ublkd.service) after the reboot"
  [ "$(systemctl show -p NRestarts --value ublkd.service)" = 0 ] || fail "ublkd.service restarted $(systemctl show -p NRestarts --value ublkd.service) times since boot"
  # Nothing but modules-load.d loads it at boot (no postinst runs now, and the module has no
  # alias that would load it on demand). Its "Inserted module" line is looked up in the whole
  # journal: logged before journald runs, it may come in through kmsg without its unit.
  grep -q '^ublk_drv ' /proc/modules || fail "ublk_drv not loaded at boot"
  systemctl is-active --quiet systemd-modules-load.service || fail "systemd-modules-load.service $(systemctl is-active systemd-modules-load.service)"
  grep -qx ublk_drv /usr/lib/modules-load.d/ublkd.conf || fail "/usr/lib/modules-load.d/ublkd.conf does not list ublk_drv"
  say "journal: $(journalctl -b --no-pager -o cat | grep -m1 "Inserted module 'ublk_drv'" || echo "no 'Inserted module' line")"
  [ -c /dev/ublk-control ] || fail "/dev/ublk-control missing after the reboot"
  wait_for 20 $UBLKCTL list || fail "ublkctl list does not answer"
  run $UBLKCTL list
  [ -z "$(ublk_devices)" ] || fail "ublk devices with the packaged (volume-less) config: $(ublk_devices)"
  # The packaged config serves nothing, and the daemon says so (an info line: the normal
  # state after an install); any warning or error is a finding.
  journalctl -b --no-pager -u ublkd.service > "$T/journal"
  grep -q 'no \[\[volume\]\] and no \[server\] in /etc/ublkd/ublk.toml: idling' "$T/journal" \
    || fail "ublkd did not say it idles with the packaged config"
  ! grep -E ' (ERROR|WARN) ' "$T/journal" || fail "ublkd logged errors or warnings at boot"
}

config_volume() {
  unit_active || fail "ublkd.service not active"
  [ ! -e /dev/ublkb0 ] || fail "/dev/ublkb0 exists before a volume is configured"
  # As a user would (packaging/check does the same on the host): the leading '#' off the
  # example volume's keys, replica entries and closing bracket.
  run sed -i -E '/^#\[\[volume\]\]/,/^#\]/ { s/^#([^ #])/\1/; s/^#(    [{]|\])/\1/ }' $CONF
  sed -n '/^\[\[volume\]\]/,/^\]/p' $CONF
  $UBLKD check-config $CONF | tee "$T/check.out"
  grep -q '(1 volume)' "$T/check.out" || fail "check-config of the edited config: $(cat "$T/check.out")"
  # The config's own note says: uncomment, then `systemctl reload ublkd`.
  _pid=$(unit_pid)
  run systemctl reload ublkd.service
  wait_dev /dev/ublkb0 60
  wait_live $VOL 60
  [ "$(unit_pid)" = "$_pid" ] || fail "the reload restarted the daemon (pid $_pid -> $(unit_pid))"
  run $UBLKCTL status $VOL
  for r in $REPLICAS; do [ -f "$r" ] || fail "replica $r not created"; done
}

# stall_run NAME SECS CMD...: fio 4k randwrite QD16 (libaio, O_DIRECT) on $FIO_FILE for
# SECS s, every block written with a crc32c header; CMD runs $ACTION_AT s in. Then a
# read pass checks every block of the file. STALL_MS: the worst write completion latency in
# ms (terse field 80: write total latency max, µs, as tests/vm/suites/bench.sh measures it).
FIO_COMMON="--filename=$FIO_FILE --size=$FIO_SIZE --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --verify=crc32c --verify_fatal=1"
stall_run() {
  _name=$1 _secs=$2; shift 2
  # shellcheck disable=SC2086
  $FIO --name="$_name" $FIO_COMMON --rw=randwrite --do_verify=0 --time_based --runtime="$_secs" \
    --norandommap --randrepeat=0 --output-format=normal,terse --output="$T/$_name.fio" &
  _f=$!
  _t0=$(cut -d. -f1 /proc/uptime)
  sleep $ACTION_AT
  say "+ $* (under fio $_name)"
  "$@" > "$T/$_name.action" 2>&1
  _arc=$?
  _t1=$(cut -d. -f1 /proc/uptime)
  cat "$T/$_name.action"
  wait $_f || fail "fio $_name exited non-zero: $(grep -E 'err=|error' "$T/$_name.fio" | head -n 3 | tr '\n' ' ')"
  [ $_arc -eq 0 ] || fail "'$*' exited $_arc under fio: $(tail -n 3 "$T/$_name.action" | tr '\n' ' ')"
  # The measure only covers the action if it ended inside fio's write phase.
  [ $((_t1 - _t0)) -lt "$_secs" ] || fail "'$*' took until ${_t1}s, past fio's ${_secs}s write phase (from ${_t0}s): give it more time"
  grep -v '^3;' "$T/$_name.fio"
  fio_ok "$T/$_name.fio"
  STALL_MS=$(awk -F';' '/^3;/ { if ($5 != 0) exit 1; printf "%d\n", $80 / 1000 }' "$T/$_name.fio") \
    || fail "fio $_name reported errors (terse)"
  [ -n "$STALL_MS" ] || fail "no terse line in fio $_name's output"
  say "$_name: worst write completion ${STALL_MS} ms"
  verify_pass "$_name-verify"
}

# verify_pass NAME: read every block of $FIO_FILE and check its crc32c header.
verify_pass() {
  $FIO --name="$1" $FIO_COMMON --rw=read --output="$T/$1.fio" \
    || fail "fio $1 (read + crc32c verify) failed: $(grep -E 'verify|err=' "$T/$1.fio" | head -n 3 | tr '\n' ' ')"
  fio_ok "$T/$1.fio"
  say "$1: every block of $FIO_FILE verified"
}

# A restart as systemd does it: SIGTERM (the old daemon hands the device over, exit 0), then
# the new daemon takes it back. Done when the new one reports the volume live.
restart_and_wait() {
  _old=$(unit_pid)
  systemctl restart ublkd.service || return 1
  wait_for 60 vol_is_live $VOL || { echo "volume not live after the restart"; return 1; }
  [ "$(unit_pid)" != "$_old" ] || { echo "same main pid $_old after the restart"; return 1; }
  echo "ublkd pid $_old -> $(unit_pid), $VOL live"
}

# The upgrade: apt-get installs the newer package; its postinst restarts the unit.
upgrade_and_wait() {
  _old=$(unit_pid)
  apt_get install "$DEB_NEW" || return 1
  wait_for 60 vol_is_live $VOL || { echo "volume not live after the upgrade"; return 1; }
  [ "$(unit_pid)" != "$_old" ] || { echo "the upgrade did not restart ublkd (pid $_old)"; return 1; }
  echo "ublkd pid $_old -> $(unit_pid), $VOL live"
}

mounted() { grep -q " $MNT ext4 " /proc/mounts; }

io_restart() {
  [ -b /dev/ublkb0 ] || fail "no /dev/ublkb0 (config_volume failed?)"
  wait_live $VOL 30
  # The inode tables written now, not by ext4lazyinit in the background of the measurements.
  run "$MKFS_EXT4" -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/ublkb0
  mkdir -p $MNT
  run "$MOUNT" /dev/ublkb0 $MNT
  run dd if=/dev/urandom of=$REF bs=1M count=16 conv=fsync status=none
  sha256sum < $REF > $REF_SUM
  # Every block gets a crc32c header first, so that the read passes can check all of them.
  run "$FIO" --name=fill $FIO_COMMON --rw=write --do_verify=0 --output="$T/fill.fio"
  stall_run nofault 25 true
  echo "RESULT pkg_nofault_maxlat_ms=$STALL_MS"
  stall_run restart 25 restart_and_wait
  mounted || fail "$MNT no longer mounted after the restart"
  echo "RESULT restart_stall_ms_pkg=$STALL_MS"
  ! journalctl -b --no-pager -u ublkd.service | grep -q "unclean shutdown" || fail "a resync after the hand-over (unclean shutdown)"
}

io_upgrade() {
  mounted || fail "$MNT not mounted (io_restart failed?)"
  wait_live $VOL 30
  [ "$(installed_version)" = "$VER_OLD" ] || fail "installed: '$(installed_version)', expected $VER_OLD before the upgrade"
  # apt-get under load in a TCG guest: 34 s alone, over 70 s with the host busy.
  stall_run upgrade 150 upgrade_and_wait
  mounted || fail "$MNT no longer mounted after the upgrade"
  [ "$(installed_version)" = "$VER_NEW" ] || fail "dpkg: '$(installed_version)' after the upgrade, expected $VER_NEW"
  unit_active || fail "ublkd.service $(systemctl is-active ublkd.service) after the upgrade"
  [ "$(systemctl is-enabled ublkd.service)" = enabled ] || fail "ublkd.service $(systemctl is-enabled ublkd.service) after the upgrade"
  # The edited config is the user's: the upgrade keeps it.
  grep -q '^\[\[volume\]\]' $CONF || fail "the upgrade reverted the edited $CONF"
  echo "RESULT upgrade_stall_ms=$STALL_MS"
}

final_verify() {
  mounted || fail "$MNT not mounted"
  drop_caches
  [ "$(sha256sum < $REF)" = "$(cat $REF_SUM)" ] || fail "$REF changed across the restart and the upgrade"
  say "$REF unchanged"
  verify_pass final
  umount_checked $MNT /dev/ublkb0
  fsck_clean /dev/ublkb0
  run $UBLKCTL status $VOL
  no_kernel_errors ublkb0
  ! dmesg | grep -E 'I/O error.*ublkb|EXT4-fs error|BUG:|Oops' || fail "kernel errors since boot"
}

# replicas_intact: the replica files exist and still hold the filesystem (ext4's magic
# 0xEF53 at byte 1080 of the volume = of each replica file).
replicas_intact() {
  for r in $REPLICAS; do
    [ -s "$r" ] || fail "replica $r gone"
    [ "$(od -An -tx1 -j1080 -N2 "$r" | tr -d ' ')" = 53ef ] || fail "replica $r no longer holds the ext4 filesystem"
  done
}

remove_live() {
  [ -b /dev/ublkb0 ] || fail "no /dev/ublkb0"
  run "$MOUNT" /dev/ublkb0 $MNT
  # The prerm stops every volume on removal (the service's stop only hands the devices over,
  # and no ublkd would come back for them); a mounted one refuses, and so does the removal.
  say "+ apt-get remove ublkd, with $VOL mounted: must be refused"
  if apt_get remove ublkd > "$T/remove.apt" 2>&1; then
    cat "$T/remove.apt"
    fail "apt-get remove succeeded with $VOL mounted"
  fi
  cat "$T/remove.apt"
  grep -q "in use" "$T/remove.apt" || fail "the refusal does not say the device is in use"
  [ -x /usr/bin/ublkd ] || fail "/usr/bin/ublkd gone after a refused remove"
  [ "$(dpkg-query -W -f='${db:Status-Abbrev}' ublkd 2>/dev/null | tr -d ' ')" = ii ] \
    || fail "dpkg status '$(dpkg-query -W -f='${db:Status-Abbrev}' ublkd)' after a refused remove, expected ii"
  wait_for 30 unit_active || fail "ublkd.service $(systemctl is-active ublkd.service) after a refused remove"
  mounted || fail "$MNT unmounted by a refused remove"
  [ "$(sha256sum < $REF)" = "$(cat $REF_SUM)" ] || fail "$REF changed across the refused remove"
  umount_checked $MNT /dev/ublkb0
  fsck_clean /dev/ublkb0
}

pkg_remove() {
  [ -n "$(installed_version)" ] || fail "ublkd not installed (remove_live failed?)"
  ! mounted || fail "$MNT still mounted"
  # With the device up and unused: the prerm stops the volume (drain, remove the device).
  [ -b /dev/ublkb0 ] || fail "no /dev/ublkb0 before the remove"
  say "+ apt-get remove ublkd"
  apt_get remove ublkd > "$T/remove.apt" 2>&1 || fail "apt-get remove exited $?: $(tail -n 3 "$T/remove.apt" | tr '\n' ' ')"
  cat "$T/remove.apt"
  [ "$(dpkg-query -W -f='${db:Status-Abbrev}' ublkd 2>/dev/null | tr -d ' ')" = rc ] \
    || fail "dpkg status '$(dpkg-query -W -f='${db:Status-Abbrev}' ublkd)', expected rc (removed, config kept)"
  for f in /usr/bin/ublkd /usr/bin/ublkctl /usr/lib/systemd/system/ublkd.service; do
    [ ! -e $f ] || fail "$f still there after remove"
  done
  ! unit_active || fail "ublkd.service still active after remove"
  [ -z "$(ublk_devices)" ] || fail "ublk devices left after remove: $(ublk_devices)"
  [ -f $CONF ] || fail "remove deleted $CONF"
  grep -q '^\[\[volume\]\]' $CONF || fail "remove reverted the edited $CONF"
  replicas_intact
}

pkg_purge() {
  say "+ apt-get purge ublkd"
  apt_get purge ublkd > "$T/purge.apt" 2>&1 || fail "apt-get purge exited $?: $(tail -n 3 "$T/purge.apt" | tr '\n' ' ')"
  cat "$T/purge.apt"
  # Purged: dpkg forgets the package, or keeps it as "un" (unknown, not installed).
  _st=$(dpkg-query -W -f='${db:Status-Abbrev}' ublkd 2>/dev/null | tr -d ' ')
  [ -z "$_st" ] || [ "$_st" = un ] || fail "dpkg status '$_st' after purge"
  [ ! -e /etc/ublkd ] || fail "/etc/ublkd still there after purge: $(ls -A /etc/ublkd | tr '\n' ' ')"
  _links=$(find /etc/systemd/system -name 'ublkd.service' 2>/dev/null)
  [ -z "$_links" ] || fail "unit links left after purge: $_links"
  # Volume data is never the package manager's to delete, purge included.
  replicas_intact
  say "after purge: $(ls -l /var/lib/ublkd | tr '\n' ' ')"
}
