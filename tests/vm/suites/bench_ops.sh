# disks: 4 size=2G
# timeout: 900
#
# Operational figures, in one boot (run it three times for a headline: BENCHMARKS.md):
#   bench_restart_stall  the worst write stall of `systemctl restart ublkd` as systemd does it
#                        (SIGTERM: the owner hands its device over; then a new owner takes it
#                        back) under 4k randwrite QD32, on a 3-way volume (local raw virtio
#                        disk, replica servers 127.0.0.2/.3 on ext4), against the same run
#                        without a restart. RESULT restart_stall_ms, restart_nofault_maxlat_ms.
#   bench_idle_cpu       what an idle node costs: 4 idle volumes (2 of them with a remote replica
#                        on a replica server in the same guest), 20 s with nothing else running:
#                        the owner's and the server's CPU in percent of the (emulated) CPU.
#                        RESULT idle_cpu_pct, idle_server_cpu_pct.
# Helpers from the bench suite.

. /tests/suites/bench.sh
SCENARIOS="bench_restart_stall bench_idle_cpu"
timeout_bench_restart_stall=600
timeout_bench_idle_cpu=300

# proc_ticks PID: user + system clock ticks of the whole process (exited threads included).
proc_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# thread_sample PID: one line per thread, "name ticks wakeups" (wakeups: voluntary context
# switches, i.e. how often the thread slept and was woken).
thread_sample() {
  local t
  for t in /proc/"$1"/task/*; do
    printf '%s %s %s\n' "$(tr ' ' _ < "$t/comm")" \
      "$(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}')" \
      "$(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status")"
  done | sort
}

# thread_table WHO BEFORE AFTER: per thread name, the ticks and wakeups per second over 20 s
# (threads summed by name; a thread absent before counts from 0).
thread_table() {
  awk -v who="$1" 'FNR == NR { b[$1] += $2; w[$1] += $3; next }
    { a[$1] += $2; x[$1] += $3 }
    END { for (n in a) printf "TABLE idle-threads %s %-18s cpu %5.2f %%  wakeups %6.1f /s\n", who, n, (a[n] - b[n]) / 20, (x[n] - w[n]) / 20 }' \
    "$2" "$3" | sort -k6 -nr
}

bench_idle_cpu() {
  need_ublk
  cluster_secret
  mkdir -p /tmp/idle
  LOG_LEVEL=warn replica_server 2 /tmp/idle/srv
  {
    printf '[node]\nstate_dir = "%s"\ncontrol_socket = "%s"\ncluster_secret_file = "%s"\nlog_level = "warn"\n' \
      "$T/state" "$SOCK" "$T/cluster.key"
    for i in 0 1 2 3; do
      printf '\n[[volume]]\nname = "idle%s"\nsize = "64MiB"\nblock_size = 4096\ndevice_id = %s\n' $i $i
      if [ $i -lt 2 ]; then
        printf 'replicas = [ { local = "/tmp/idle/l%s.img" }, { remote = "127.0.0.2:7450", id = "idle%s" } ]\n' $i $i
      else
        printf 'replicas = [ { local = "/tmp/idle/l%s.img" } ]\n' $i
      fi
    done
  } > "$T/idle.conf"
  cp "$T/idle.conf" "$T/last.conf"
  start_ublkd "$T/idle.conf"
  for i in 0 1 2 3; do wait_live idle$i 60; done
  sleep 10   # start-up work done
  o0=$(proc_ticks "$DPID") s0=$(proc_ticks "$SRV_2")
  thread_sample "$DPID" > "$T/own.0"; thread_sample "$SRV_2" > "$T/srv.0"
  sleep 20
  o1=$(proc_ticks "$DPID") s1=$(proc_ticks "$SRV_2")
  thread_sample "$DPID" > "$T/own.1"; thread_sample "$SRV_2" > "$T/srv.1"
  thread_table owner "$T/own.0" "$T/own.1"
  thread_table server "$T/srv.0" "$T/srv.1"
  # USER_HZ 100: ticks over 20 s / 20 = percent of one CPU.
  owner=$(awk -v d=$((o1 - o0)) 'BEGIN { printf "%.2f", d / 20 }')
  server=$(awk -v d=$((s1 - s0)) 'BEGIN { printf "%.2f", d / 20 }')
  echo "RESULT idle_cpu_pct=$owner"
  echo "RESULT idle_server_cpu_pct=$server"
  echo "TABLE idle: 4 idle volumes (2 with a remote replica), 20 s: owner $owner % of a CPU, replica server $server %"
  stop_ublkd 60 || fail "owner did not stop"
  rm -rf /tmp/idle
}

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
  repl_disks
  LOG_LEVEL=warn replica_server 2 /mnt/srv2
  LOG_LEVEL=warn replica_server 3 /mnt/srv3
  TAG=restart; wipe_label "$local_disk"
  repl_owner $TAG "{ local = \"$local_disk\" }, { remote = \"127.0.0.2:7450\", id = \"rs\" }, { remote = \"127.0.0.3:7450\", id = \"rs\" }"
  prefill
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
