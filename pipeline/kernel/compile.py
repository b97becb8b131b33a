"""Compile and load bpf/sluice.c with bcc in a short-lived process; hand the fds back.

Run by pipeline.kernel.loader.load_classifier as `python -m pipeline.kernel.compile FD
BPF_DIR RINGBUF_PAGES`, FD being one end of a socketpair. bcc's compiler (LLVM) stays
resident in whichever process used it, about 200 MB: here that process exits a moment
later, and capture keeps only the program and map file descriptors, which this one sends
over the socket (SCM_RIGHTS) in one message: a JSON list of names, then the fds in order.
bcc pins the maps under BPF_DIR as it loads them (BPF_TABLE_PINNED), re-adopting pins an
earlier run left. A failure is one JSON {"error": "..."} message instead, and exit code 1.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from .loader import BPF_SOURCE, CLAIM_PROGRAM, EGRESS_PROGRAM, HOOKS, MAPS, SOCK_EGRESS, cflags


def load(bpf_dir: Path, ringbuf_pages: int) -> tuple[list[str], list[int], object]:
    from bcc import BPF

    bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags(bpf_dir, ringbuf_pages))
    names, fds = [], []
    for program in (EGRESS_PROGRAM, CLAIM_PROGRAM):  # the claim is run, never attached
        names.append(program)
        fds.append(bpf.load_func(program.encode(), BPF.SCHED_CLS).fd)
    for hook in HOOKS:
        names.append(hook.function)
        if hook.attach_type == SOCK_EGRESS:
            fds.append(bpf.load_func(hook.function.encode(), BPF.CGROUP_SKB).fd)
        else:
            fds.append(bpf.load_func(hook.function.encode(), BPF.CGROUP_SOCK_ADDR,
                                     attach_type=hook.attach_type).fd)
    for name in MAPS:
        names.append(name)
        fds.append(bpf[name.encode()].map_fd)
    return names, fds, bpf


def main(argv: list[str]) -> int:
    channel = socket.socket(fileno=int(argv[0]))
    try:
        names, fds, _bpf = load(Path(argv[1]), int(argv[2]))
    except Exception as err:  # noqa: BLE001 - bcc raises bare Exception for compile and verifier errors
        message = " ".join(str(err).split()) or type(err).__name__
        channel.sendall(json.dumps({"error": message[-2000:]}).encode())
        return 1
    socket.send_fds(channel, [json.dumps(names).encode()], fds)
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
