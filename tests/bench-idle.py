"""How idle the machine is while the agent works (BENCHMARKS.md, "Where the aims stand").

Samples /proc/stat and the running agent's CPU (`claude-runner agent`, or the agent of a
bench run) every 50 ms for SECONDS, then prints per second the machine's idle share and
the agent's clock ticks, and for the busiest stretch (the 8-client phase of a bench run:
seconds under 20 % idle) the idle share in the intervals where the agent worked (the
edge's blocks) and where it did not (the direct spawns' blocks).

    python3 tests/bench-idle.py SECONDS      # start it with (or just after) the bench
"""
import collections, glob, sys, time

def machine():
    fields = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(fields), fields[3] + fields[4]

def ticks(pid):
    try:
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(stat[11]) + int(stat[12])
    except OSError:
        return None

def find_agent():
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            argv = open(path, "rb").read().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0].endswith(b"claude-runner") and argv[1] == b"agent":
            return int(path.split("/")[2])
    return None

samples, agent, end = [], None, time.time() + float(sys.argv[1])
while time.time() < end:
    agent = agent or find_agent()
    total, idle = machine()
    samples.append((time.time(), total, idle, ticks(agent) if agent else None))
    time.sleep(0.05)
rows = []
for (_, t0, i0, a0), (t, t1, i1, a1) in zip(samples, samples[1:]):
    if a0 is not None and a1 is not None and t1 > t0:
        rows.append((t, (i1 - i0) / (t1 - t0), a1 - a0))
seconds = collections.OrderedDict()
for t, idle, work in rows:
    seconds.setdefault(int(t), []).append((idle, work))
for second, v in seconds.items():
    print(time.strftime("%H:%M:%S", time.gmtime(second)), f"idle {100 * sum(i for i, _ in v) / len(v):5.1f} %  agent ticks {sum(w for _, w in v)}")
busy = [s for s, v in seconds.items() if sum(i for i, _ in v) / len(v) < 0.2]
if busy:
    lo, hi = min(busy), max(busy) + 1
    edge = [i for t, i, w in rows if lo <= t < hi and w >= 2]
    direct = [i for t, i, w in rows if lo <= t < hi and w == 0]
    print(f"busiest stretch: agent working {len(edge)} intervals, idle {100 * sum(edge) / max(1, len(edge)):.1f} %; "
          f"agent idle {len(direct)} intervals, idle {100 * sum(direct) / max(1, len(direct)):.1f} %")
