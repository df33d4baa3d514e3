"""Classic BPF socket filter that drops netlink messages sent on behalf of given port ids.

Every ctnetlink event carries, in its netlink header, the port id of the socket whose request
caused it (0 for packets). Attached to the event socket, this filter drops the echoes of
lbsync's own injections inside the kernel, before they are queued: a 100k-entry commit then
costs the event reader nothing (conntrackd filters its event socket the same way).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27

BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JMP_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
NLMSG_PID_OFFSET = 12  # offsetof(struct nlmsghdr, nlmsg_pid)

_INSN = struct.Struct("=HBBI")


def drop_portids_program(portids: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """The program as (code, jt, jf, k) instructions.

    ``BPF_LD|BPF_W|BPF_ABS`` loads the word in network byte order while ``nlmsg_pid`` is in host
    order, so each port id is compared in its byte-swapped (as loaded) form.
    """
    n = len(portids)
    prog = [(BPF_LD_W_ABS, 0, 0, NLMSG_PID_OFFSET)]
    for i, pid in enumerate(portids):
        as_loaded = int.from_bytes(struct.pack("=I", pid), "big")
        # match: jump to the drop at the end; no match: next comparison (or accept)
        prog.append((BPF_JMP_JEQ_K, n - i, 0, as_loaded))
    prog.append((BPF_RET_K, 0, 0, 0xFFFFFFFF))  # accept the whole message
    prog.append((BPF_RET_K, 0, 0, 0))  # drop
    return prog


def attach_drop_portids(sock: socket.socket, portids: Sequence[int]) -> None:
    """Attach (replacing any previous) the drop filter to ``sock``."""
    prog = drop_portids_program(portids)
    code = b"".join(_INSN.pack(*insn) for insn in prog)
    buf = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HP", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
