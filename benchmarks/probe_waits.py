"""Where the flood benchmark's DNS probe waited for a CPU (`benchmarks/flood.py --trace-waits`).

The probe's answer can reach its socket in time and still be seen late: the probe, woken by
it, waits for a CPU. This traces, with the kernel's scheduler tracepoints, every wait of the
probe's thread from its wake-up to its switch-in, and which processes held that CPU
meanwhile, so the flood's report can say what the probe waited behind: sluice's stages, the
sender, the busy program or anything else.

A wait is followed from CPU to CPU: if the scheduler moves the waiting probe to another
CPU before it runs, the holders of that one are counted from the move on, and only the CPU
a wait is queued on is charged for it.

bcc reads the tracepoints' fields from tracefs: where the machine has not mounted it, it is
mounted for the run and unmounted at its end.
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from bcc import BPF

TRACEFS = Path("/sys/kernel/tracing")

BUCKET_US = 100  # each wait in 0.1 ms buckets, the last one for everything longer
BUCKETS = 200

PROGRAM = r"""
#define BUCKET_US %(bucket_us)d
#define BUCKETS %(buckets)d
#define CPUS %(cpus)d

BPF_HASH(watched, u32, u8);             // the probe's thread ids (user space fills it)
struct wait { u64 woke; u64 here; u32 cpu; };
BPF_HASH(waiting, u32, struct wait);    // a watched thread woken and not yet run: since when,
                                        // and since when on the CPU it is queued on
BPF_ARRAY(waiting_on, u32, CPUS);       // per CPU: the watched thread queued on it, or 0
BPF_ARRAY(running_since, u64, CPUS);    // per CPU: when its current task switched in
BPF_HASH(held_ns, u32, u64);            // process id: its time on a CPU a watched thread waited for
BPF_ARRAY(waits, u64, BUCKETS);

TRACEPOINT_PROBE(sched, sched_wakeup) {
    u32 tid = args->pid;
    if (!watched.lookup(&tid))
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct wait w = {.woke = now, .here = now, .cpu = args->target_cpu};
    waiting.update(&tid, &w);
    waiting_on.update(&w.cpu, &tid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_migrate_task) {
    u32 tid = args->pid;
    struct wait *w = waiting.lookup(&tid);
    if (!w)
        return 0;  // not waiting: a move as it is woken comes before its sched_wakeup
    u32 none = 0, from = w->cpu;
    u32 *queued = waiting_on.lookup(&from);
    if (queued && *queued == tid)
        waiting_on.update(&from, &none);
    w->cpu = args->dest_cpu;
    w->here = bpf_ktime_get_ns();
    waiting_on.update(&w->cpu, &tid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch) {
    u32 cpu = bpf_get_smp_processor_id();
    u64 now = bpf_ktime_get_ns();
    u64 *since = running_since.lookup(&cpu);
    u32 *waiter = waiting_on.lookup(&cpu);
    if (since && waiter && *waiter) {
        struct wait *w = waiting.lookup(waiter);
        if (w && w->cpu == cpu) {
            u64 from = *since > w->here ? *since : w->here;
            u32 holder = bpf_get_current_pid_tgid() >> 32;  // the task switched out
            u64 zero = 0, *held = held_ns.lookup_or_try_init(&holder, &zero);
            if (held)
                __sync_fetch_and_add(held, now - from);
        }
    }
    if (since)
        *since = now;
    u32 next = args->next_pid;
    struct wait *w = waiting.lookup(&next);
    if (!w)
        return 0;
    u32 bucket = (now - w->woke) / 1000 / BUCKET_US;
    if (bucket >= BUCKETS)
        bucket = BUCKETS - 1;
    u64 *count = waits.lookup(&bucket);
    if (count)
        __sync_fetch_and_add(count, 1);
    waiting.delete(&next);
    if (waiter && *waiter == next) {
        u32 none = 0;
        waiting_on.update(&cpu, &none);
    }
    return 0;
}
"""


class ProbeWaits:
    """Loaded before the flood; watch(pid) once the probe runs; line(labels) after; close()."""

    def __init__(self, cpus: int) -> None:
        self.mounted = not (TRACEFS / "events").is_dir()
        if self.mounted:
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
        try:
            self.bpf = BPF(text=PROGRAM % {"bucket_us": BUCKET_US, "buckets": BUCKETS,
                                           "cpus": cpus})
        except Exception:
            self._unmount()  # no close() follows a failed start
            raise

    def watch(self, pid: int) -> None:
        self.bpf["watched"][self.bpf["watched"].Key(pid)] = self.bpf["watched"].Leaf(1)

    def line(self, labels: dict[int, str]) -> str:
        """labels: process id -> name; the rest is "other", and 0 is the CPU left idle."""
        counts = [count.value for count in self.bpf["waits"].values()]
        held: dict[str, float] = {}
        for pid, ns in self.bpf["held_ns"].items():
            name = labels.get(pid.value, "idle" if pid.value == 0 else "other")
            held[name] = held.get(name, 0.0) + ns.value / 1e6
        waits = [(i + 0.5) * BUCKET_US / 1000 for i, n in enumerate(counts) for _ in range(n)]
        if len(waits) < 2:
            return "probe's CPU waits         too few to trace"
        quantile = statistics.quantiles(waits, n=100, method="inclusive")
        total = sum(held.values()) or 1.0
        return (f"probe's CPU waits         {len(waits)} wake-ups: p50 {quantile[49]:.2f} ms, "
                f"p99 {quantile[98]:.2f} ms, {sum(w > 1 for w in waits)} over 1 ms; its CPU "
                "meanwhile ran " + ", ".join(
                    f"{name} {ms / total:.0%}" for name, ms in
                    sorted(held.items(), key=lambda item: -item[1])))

    def close(self) -> None:
        self.bpf.cleanup()
        self._unmount()

    def _unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(TRACEFS)], check=True)
