#!/usr/bin/env bash
# What a flood of idle connections costs the native edge (BENCHMARKS.md, "Connections"):
# starts the edge with MAX_CONNECTIONS=CAP, opens N TCP connections that never send a byte,
# and prints the edge's RSS before, while they are held, and after they close, with its
# open descriptors and the warnings it logged.
#
#   bash tests/bench-connections.sh CAP N      (EDGE=<path> for another build; default debug)
set -euo pipefail
cap=${1:?CAP}; n=${2:?N}
cd "$(dirname "$0")/.."
edge=${EDGE:-target/debug/claude-runner-edge}
dir=$(mktemp -d); trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
eval "$(target/debug/claude-runner keygen | grep -E '^(RUNNER_SECRET|EDGE_SIGNING_KEY|AGENT_PUBLIC_KEYS)=' | sed 's/^/export /')"
LISTEN=127.0.0.1:0 DATA_DIR=$dir/db MAX_CONNECTIONS=$cap LOG_FORMAT=json "$edge" >"$dir/log" 2>&1 &
pid=$!
until grep -q '"edge ready"' "$dir/log"; do kill -0 $pid; sleep 0.1; done
port=$(grep -o '"listen":"127.0.0.1:[0-9]*' "$dir/log" | grep -o '[0-9]*$')
python3 - "$pid" "$port" "$n" <<'PY'
import os, resource, socket, sys, time
pid, port, n = map(int, sys.argv[1:])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
def rss():
    return next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS"))
before = rss()
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
time.sleep(2)
during, fds = rss(), len(os.listdir(f"/proc/{pid}/fd"))
for s in held:
    s.close()
time.sleep(2)
print(f"N={n} rss_before={before} KiB held={during} KiB (+{(during - before) * 1024 / n:.0f} B per connection) edge_fds={fds} after={rss()} KiB")
PY
grep -o '"max_connections":[0-9]*,"nofile":[0-9]*' "$dir/log"
echo "warnings: $(grep -c 'too many connections' "$dir/log" || true)"
