#!/usr/bin/env python3
"""Where a sequential job's time goes outside Claude: a timeline of the bench's jobs across
the bench, the edge, the agent, its launcher, the warden and the stand-in, from the
system calls each makes (BENCHMARKS.md, "The per-job hot path", "A timeline").

    python3 tests/timeline.py record OUT.data [bench arguments]   # runs the bench under perf
    python3 tests/timeline.py report OUT.data...                  # p50 µs of each hop

`record` runs `target/release/bench` (CLAUDE_RUNNER_BIN_DIR picks the binaries, as for the
bench) under `perf record`, following its whole process tree, with a kernel-side filter so
that only the few system calls that mark a hop are written. Use `--clients 1`: both runs
are then sequential, and every job's calls can be told apart. Needs `perf` and the right
to trace (root, or kernel.perf_event_paranoid <= 1).

A job is found from the stand-in's `execve` under the warden (the bench's direct spawns
are children of the bench, and are reported apart), and its marks are the calls around
it, each the nearest of its kind in its process:

    B_send       the bench writes the POST /execute             (bench: writev)
    E_req        the edge has read it                          (edge: recvfrom returns)
    E_order      the edge sends the signed order               (edge: sendto, > 300 B)
    A_order      the agent has read it                         (agent: recvfrom returns)
    A_accepted   the agent sends `Accepted`                    (agent: sendto)
    A_ws         the job's workspace is there                  (agent: mkdir, or the rename
                                                                  of one made ahead, returns)
    A_launch     the launcher is asked to start Claude         (agent: sendmsg)
    L_recv       the launcher has the request                  (launcher: recvmsg returns)
    L_fork       the launcher forks the warden                 (launcher: clone)
    W_clone      the warden starts Claude                      (warden: clone)
    S_exec       Claude (the stand-in) is exec'd               (execve)
    S_exit       it exits                                      (exit_group)
    A_out        the agent's first frame after it              (agent: sendto)
    A_result     the agent's last frame before the answer      (agent: sendto)
    E_res        the edge has read it                          (edge: recvfrom returns)
    E_answer     the edge answers the POST                     (edge: writev)
    B_recv       the bench has the answer                      (bench: recvfrom returns)

and, beside the chain, A_ws_call (the workspace's call made), A_mark / A_marked (the
started record's pwrite and its fdatasync's return), A_eof (the agent reads the end of
Claude's stdout) and W_status (the warden writes Claude's exit status to the agent). A
hop can be negative where two tasks run side by side (the `Accepted` frame and the job's
start, on a multi-threaded agent). Frames queued together and written at once make
A_out and A_result the same call.
"""
import bisect
import collections
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# x86_64 numbers of the calls that mark hops (the filter keeps the capture small).
MARKS = {'read': 0, 'write': 1, 'pwrite64': 18, 'writev': 20, 'sendto': 44, 'recvfrom': 45, 'sendmsg': 46,
         'recvmsg': 47, 'clone': 56, 'execve': 59, 'wait4': 61, 'fdatasync': 75, 'rename': 82, 'mkdir': 83,
         'exit_group': 231, 'renameat': 264, 'renameat2': 316}
NAME = {v: k for k, v in MARKS.items()}


def record(out, bench_args):
    filt = ' || '.join(f'id == {n}' for n in sorted(MARKS.values()))
    cmd = ['perf', 'record', '-q', '-o', out,
           '-e', 'raw_syscalls:sys_enter', '--filter', filt, '-e', 'raw_syscalls:sys_exit', '--filter', filt,
           '-e', 'sched:sched_process_exec', '-e', 'sched:sched_process_fork',
           '--', os.path.join(ROOT, 'target/release/bench')] + bench_args
    sys.exit(subprocess.call(cmd))


LINE = re.compile(r'\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)')


def load(data):
    """Calls as (t_enter, t_exit, pid, tid, name, ret), and each pid's role."""
    text = subprocess.run(['perf', 'script', '-i', data, '-F', 'comm,pid,tid,time,event,trace'],
                          capture_output=True, text=True, check=True).stdout
    role, parent, pending, calls = {}, {}, {}, []
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, tid, t, event, rest = m.groups()
        pid, tid, t = int(pid), int(tid), float(t)
        if event == 'sched:sched_process_fork':
            child = int(re.search(r'child_pid=(\d+)', rest).group(1))
            parent.setdefault(child, pid)
            role.setdefault(child, role.get(pid, 'bench'))
        elif event == 'sched:sched_process_exec':
            path = re.search(r'filename=(\S+)', rest).group(1)
            if path.endswith('claude-runner-edge'):
                role[pid] = 'edge'
            elif path.endswith('claude-standin'):
                role[pid] = 'standin' if role.get(pid) in ('launcher', 'warden') else 'direct'
            elif path.endswith('claude-runner'):
                role[pid] = 'agent'
            elif path.endswith('/exe') and role.get(pid) == 'agent':
                role[pid] = 'launcher'
            elif path.endswith('/bench'):
                role[pid] = 'bench'
            else:
                role[pid] = 'other'
        elif event == 'raw_syscalls:sys_enter':
            nr = int(re.match(r'NR (\d+)', rest).group(1))
            if nr == MARKS['exit_group']:
                calls.append((t, t, pid, tid, 'exit_group', 0))
            else:
                pending[tid] = (t, nr)
        elif event == 'raw_syscalls:sys_exit' and tid in pending:
            t0, nr = pending.pop(tid)
            ret = int(re.match(r'NR -?\d+ = (-?\d+)', rest).group(1))
            calls.append((t0, t, pid, tid, NAME.get(nr, str(nr)), ret))
    # A process the launcher forked is a warden until it execs Claude.
    for pid, r in role.items():
        if r == 'launcher' and role.get(parent.get(pid)) == 'launcher':
            role[pid] = 'warden'
    return role, sorted(calls)


class Calls:
    def __init__(self, role, calls):
        self.by = collections.defaultdict(list)
        for c in calls:
            self.by[(role.get(c[2], '?'), c[4])].append(c)
        self.t = {k: [c[0] for c in v] for k, v in self.by.items()}

    def after(self, who, name, t, ok=lambda c: True, within=0.05):
        lst = self.by.get((who, name), [])
        i = bisect.bisect_right(self.t.get((who, name), []), t)
        while i < len(lst) and lst[i][0] < t + within:
            if ok(lst[i]):
                return lst[i]
            i += 1
        raise LookupError(who, name)

    def has_before(self, who, name, t, within=0.05):
        try:
            self.before(who, name, t, within=within)
            return True
        except LookupError:
            return False

    def before(self, who, name, t, ok=lambda c: True, within=0.05):
        lst = self.by.get((who, name), [])
        i = bisect.bisect_left(self.t.get((who, name), []), t) - 1
        while i >= 0 and lst[i][0] > t - within:
            if ok(lst[i]):
                return lst[i]
            i -= 1
        raise LookupError(who, name)


CHAIN = ['B_send', 'E_req', 'E_order', 'A_order', 'A_accepted', 'A_ws', 'A_launch', 'L_recv', 'L_fork',
         'W_clone', 'S_exec', 'S_exit', 'A_out', 'A_result', 'E_res', 'E_answer', 'B_recv']
ASIDE = [('A_ws_call', 'A_ws'), ('A_ws', 'A_mark'), ('A_mark', 'A_marked'), ('A_marked', 'S_exec'), ('A_launch', 'S_exec'),
         ('S_exit', 'A_eof'), ('S_exit', 'W_status'), ('W_status', 'A_out'), ('S_exec', 'S_exit'), ('B_send', 'B_recv')]


def job(calls, ex):
    t, m = ex[0], {'S_exec': ex[0]}
    m['S_exit'] = calls.after('standin', 'exit_group', t, lambda c: c[2] == ex[2])[0]
    m['W_clone'] = calls.before('warden', 'clone', t)[0]
    m['L_fork'] = calls.before('launcher', 'clone', t)[0]
    m['L_recv'] = calls.before('launcher', 'recvmsg', m['L_fork'])[1]
    m['A_launch'] = calls.before('agent', 'sendmsg', m['L_recv'])[0]
    made = max((calls.before('agent', name, m['A_launch'], lambda c: c[5] == 0) for name in ('mkdir', 'rename', 'renameat', 'renameat2')
                if calls.has_before('agent', name, m['A_launch'])), key=lambda c: c[0])
    m['A_ws_call'], m['A_ws'] = made[0], made[1]
    m['E_order'] = calls.before('edge', 'sendto', m['A_ws_call'], lambda c: c[5] > 300)[0]
    m['A_order'] = calls.after('agent', 'recvfrom', m['E_order'])[1]
    m['A_accepted'] = calls.after('agent', 'sendto', m['A_order'])[0]
    m['E_req'] = calls.before('edge', 'recvfrom', m['E_order'])[1]
    m['B_send'] = calls.before('bench', 'writev', m['E_req'])[0]
    mark = calls.after('agent', 'pwrite64', m['A_ws'], lambda c: c[5] < 400)
    m['A_mark'] = mark[0]
    m['A_marked'] = calls.after('agent', 'fdatasync', mark[0], lambda c: c[3] == mark[3])[1]
    m['A_out'] = calls.after('agent', 'sendto', m['S_exit'])[0]
    m['E_answer'] = calls.after('edge', 'writev', m['A_out'])[0]
    m['A_result'] = calls.before('agent', 'sendto', m['E_answer'])[0]
    m['E_res'] = calls.before('edge', 'recvfrom', m['E_answer'])[1]
    m['B_recv'] = calls.after('bench', 'recvfrom', m['E_answer'])[1]
    m['A_eof'] = calls.after('agent', 'read', m['S_exit'], lambda c: c[5] == 0)[1]
    m['W_status'] = calls.after('warden', 'write', m['S_exit'], lambda c: c[5] == 4)[0]
    return m


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(captures):
    jobs, execs, direct = [], 0, []
    for data in captures:
        role, calls = load(data)
        index = Calls(role, calls)
        for ex in index.by.get(('standin', 'execve'), []):
            execs += 1
            try:
                jobs.append(job(index, ex))
            except LookupError:
                pass
        for ex in index.by.get(('direct', 'execve'), []):
            try:
                direct.append((index.after('direct', 'exit_group', ex[0], lambda c: c[2] == ex[2])[0] - ex[0]) * 1e6)
            except LookupError:
                pass
    print(f'{len(jobs)} of {execs} jobs through the edge traced')
    print(f"{'hop':28} {'p50 µs':>7} {'p25':>6} {'p75':>6} {'p90':>6}")
    for rows in (list(zip(CHAIN, CHAIN[1:])), ASIDE):
        for a, b in rows:
            d = [(j[b] - j[a]) * 1e6 for j in jobs]
            print(f"{a + ' → ' + b:28} {pct(d, .5):7.0f} {pct(d, .25):6.0f} {pct(d, .75):6.0f} {pct(d, .9):6.0f}")
        print()
    outside = [((j['B_recv'] - j['B_send']) - (j['S_exit'] - j['S_exec'])) * 1e6 for j in jobs]
    print(f"{'all but the stand-in':28} {pct(outside, .5):7.0f}")
    if direct:
        print(f"{'direct stand-in exec → exit':28} {pct(direct, .5):7.0f}   ({len(direct)} direct spawns)")


if __name__ == '__main__':
    if len(sys.argv) >= 3 and sys.argv[1] == 'record':
        record(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) >= 3 and sys.argv[1] == 'report':
        report(sys.argv[2:])
    else:
        print(__doc__)
        sys.exit(2)
