#!/usr/bin/env bash
# A/B of two builds through `bench` (BENCHMARKS.md, "The per-job hot path"): runs the
# bench against each build's binaries in alternation (A B, B A, ...) so that the machine's
# drift falls on both, and prints each run's figures side by side.
#
#   bash tests/bench-ab.sh A_DIR B_DIR PAIRS JOBS OUTDIR [BENCH]
#
# A_DIR, B_DIR: folders with claude-runner, claude-runner-edge and claude-standin (copy
# each build's target/release/ ones into a folder of its own); BENCH: the bench binary
# both use (default A_DIR/bench). Each run: bench --edge native --jobs JOBS --offline 10.
# FRESHFS=1 (root): each run's TMPDIR is a fresh journaled 4 GiB ext4 on a loop file, so
# no run meets the inodes an earlier one freed (this VM's root ext4 has no journal, and
# its allocator skips recently freed inodes: "The agent's own CPU per job" in BENCHMARKS).
set -euo pipefail
A=${1:?A_DIR}; B=${2:?B_DIR}; PAIRS=${3:?PAIRS}; JOBS=${4:?JOBS}; OUT=${5:?OUTDIR}; BENCH=${6:-$A/bench}
mkdir -p "$OUT"
# BENCHFS_MNT / BENCHFS_IMG: where the loop file system goes, so two A/Bs can run at once.
mnt=${BENCHFS_MNT:-/mnt/claude-runner-benchfs} img=${BENCHFS_IMG:-/var/tmp/claude-runner-benchfs.img}
run() { # DIR LABEL
  local dir=$1 label=$2 tmp=${TMPDIR:-/tmp}
  # Binaries read whole into the page cache first: no run pays for the other's reads.
  cat "$dir/claude-runner" "$dir/claude-runner-edge" "$dir/claude-standin" "$BENCH" >/dev/null
  if [ "${FRESHFS:-0}" = 1 ]; then
    umount "$mnt" 2>/dev/null || true
    rm -f "$img"; truncate -s 4G "$img"; mkfs.ext4 -q -F "$img"
    mkdir -p "$mnt"; mount -o loop "$img" "$mnt"; tmp=$mnt
  fi
  echo "$(date -u +%T) $label load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/runs.txt"
  TMPDIR=$tmp CLAUDE_RUNNER_BIN_DIR=$dir "$BENCH" --edge native --jobs "$JOBS" --offline 10 --json "$OUT/$label.json" >"$OUT/$label.txt" 2>&1 \
    || echo "run $label failed: see $OUT/$label.txt" | tee -a "$OUT/runs.txt"
  if [ "${FRESHFS:-0}" = 1 ]; then umount "$mnt"; rm -f "$img"; fi
}
for i in $(seq 1 "$PAIRS"); do
  if [ $((i % 2)) = 1 ]; then run "$A" "A$i"; run "$B" "B$i"; else run "$B" "B$i"; run "$A" "A$i"; fi
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
rows = [
    ("overhead, sequential, p50 ms", ("sequential", "overhead_p50_ms")),
    ("overhead, sequential, p99 ms", ("sequential", "overhead_p99_ms")),
    ("outside the agent's job p50 ms", ("sequential", "outside_agent_job", "p50_ms")),
    ("8 clients, jobs/s", ("concurrent", "edge_jobs_per_s")),
    ("direct, 8 at once, jobs/s", ("concurrent", "direct_jobs_per_s")),
    ("agent CPU per job ms", ("cpu", "agent_ms_per_job")),
    ("edge CPU per job ms", ("cpu", "edge_ms_per_job")),
    ("stand-in CPU per job ms", ("cpu", "standin_ms_per_job_via_agent")),
]
runs = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    edge = json.load(open(f))["edges"]["native"]
    if "error" not in edge:
        runs[os.path.basename(f)[:-5]] = edge
def get(d, keys):
    for k in keys:
        d = d[k]
    return d
labels = sorted(runs, key=lambda l: (l[1:], l[0]))
print(f"{'':32s}" + "".join(f"{l:>9s}" for l in labels))
for name, keys in rows:
    print(f"{name:32s}" + "".join(f"{get(runs[l], keys):9.3f}" for l in labels))
ratio = [get(runs[l], rows[3][1]) / get(runs[l], rows[4][1]) * 100 for l in labels]
print(f"{'through the edge / direct %':32s}" + "".join(f"{r:9.1f}" for r in ratio))
PY
