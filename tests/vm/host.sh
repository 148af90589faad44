# Host-side helpers shared by tests/vm/run (initramfs guests) and tests/vm/debian (a Debian
# root filesystem with systemd). Sourced by bash scripts running with `set -euo pipefail`.

log() { printf '[vm] %s\n' "$*" >&2; }
die() { printf '[vm] error: %s\n' "$*" >&2; exit 2; }

# The newest 6.12 cloud kernel of bookworm(-security): the meta-package, and the concrete
# package it depends on (e.g. linux-image-6.12.117+deb12-cloud-amd64). Its "-unsigned" twin
# is preferred: it holds the same vmlinuz (unsigned) and modules and needs no signing tooling.
META=linux-image-6.12-cloud-amd64
resolve_kernel_pkg() {
  local dep
  dep="$(apt-cache show "$META" 2>/dev/null | awk -F': ' '/^Depends:/ {print $2; exit}' \
         | tr ',' '\n' | sed 's/[ (].*//; s/^ *//' | grep '^linux-image-' | head -n1)" || true
  [ -n "$dep" ] || return 1
  if apt-cache show "$dep-unsigned" >/dev/null 2>&1; then echo "$dep-unsigned"; else echo "$dep"; fi
}

# vm_elapsed T0: seconds since T0 (date +%s.%N), one decimal.
vm_elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# vm_progress T0: reads the guest console on stdin and prints the progress only (the verdict
# comes from parsing the log afterwards); UBLKD_VM_VERBOSE=1 streams the whole console.
vm_progress() {
  local t0="$1" l v n secs
  if [ "${UBLKD_VM_VERBOSE:-0}" = 1 ]; then cat; return; fi
  # grep --line-buffered: progress must show up while the guest runs (tr/sed would buffer).
  grep --line-buffered -aoE '@@(BOOTED|START|RESULT|CUT|REBOOT) .*' | while IFS= read -r l; do
    l="${l%$'\r'}"
    case "$l" in
      "@@BOOTED "*) log "guest up after $(vm_elapsed "$t0") s" ;;
      "@@START "*) log "running ${l#@@START }" ;;
      "@@CUT "*) log "power cut: ${l#@@CUT }" ;;
      "@@REBOOT "*) log "guest reboots: ${l#@@REBOOT }" ;;
      "@@RESULT "*) set -- ${l#@@RESULT }; v="$1" n="$2" secs="$3"; shift 3 || shift $#
                    log "  $n: ${v,,} after ${secs}s${*:+ ($*)}" ;;
    esac
  done
}

# vm_verdict CONSOLE_LOG QEMU_RC TIMEOUT SUITE: PASS/FAIL per scenario from the guest's markers
# (each at the start of a line, but matched anywhere since kernel messages may share the
# serial line), the RESULT/TABLE lines, and `N passed, M failed`. Returns non-zero on any
# failure, when the guest did not finish, or when nothing ran.
#   @@PLAN a b c                    scenarios the guest is going to run
#   @@START name
#   @@RESULT PASS|FAIL name SECS [reason...]
#   @@LOG BEGIN name / @@LOG END name   diagnostics for a failed scenario
#   @@DONE                          suite finished, guest is powering off
#   @@CUT name boot N               a power cut (multi-boot suites): the host boots again
#   @@REBOOT boot N                 a reboot (tests/vm/debian): the host boots again
vm_verdict() {
  local console="$1" qemu_rc="$2" timeout="$3" suite="$4"
  local markers plan passed=0 failed=0 l verdict name finished why
  local -A done_=()
  markers="$(grep -aoE '@@(PLAN|START|RESULT|DONE)( .*)?$' "$console" || true)"
  plan="$(sed -n 's/^@@PLAN //p' <<<"$markers" | head -n1)"
  while IFS= read -r l; do
    [ -n "$l" ] || continue
    set -- $l                      # @@RESULT VERDICT NAME SECS REASON...
    verdict="$2" name="$3"; shift 4 || shift $#
    done_[$name]=1
    if [ "$verdict" = PASS ]; then
      echo "PASS $name"; passed=$((passed + 1))
    else
      echo "FAIL $name (${*:-no reason given})"; failed=$((failed + 1))
      # Diagnostics the guest printed for this scenario.
      awk -v n="$name" '$0 ~ "@@LOG BEGIN " n "$" {p=1; next} $0 ~ "@@LOG END " n "$" {p=0} p' "$console" \
        | sed 's/^/    | /'
    fi
  done < <(grep '^@@RESULT ' <<<"$markers")

  finished=1; grep -q '^@@DONE' <<<"$markers" || finished=0
  if [ "$finished" = 0 ]; then
    if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then why="guest timed out after ${timeout}s"
    else why="guest stopped before finishing (qemu exit $qemu_rc)"; fi
  else
    why="guest runner ended without a result for it"
  fi
  # Scenarios that started or were planned but never reported count as failures.
  for name in $(sed -n 's/^@@START //p' <<<"$markers") $plan; do
    [ -z "${done_[$name]:-}" ] || continue
    done_[$name]=1
    echo "FAIL $name (no result: $why)"; failed=$((failed + 1))
  done
  if [ "$finished" = 0 ]; then
    echo "---- last 60 console lines ($console) ----"
    tail -n 60 "$console" | sed 's/^/    | /'
    [ "$failed" -gt 0 ] || { echo "FAIL $suite ($why)"; failed=1; }
  fi

  # Measurements a suite printed as `RESULT name=value` (benchmarks), and its TABLE lines.
  grep -aoE '^(RESULT [A-Za-z0-9_]+=[^ ]+|TABLE .*)$' "$console" || true
  echo "console log: $console"
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] && [ "$finished" = 1 ]
}
