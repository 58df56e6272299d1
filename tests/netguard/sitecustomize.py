"""Loaded by every Python process started with this folder on PYTHONPATH (tests only).

Records every socket connect and name lookup to the file in $CURATE_NETGUARD_LOG
and *blocks* any that would leave 127.0.0.0/8 (raising before the syscall), so a
test can both detect and prevent traffic to cloud-metadata addresses.
"""

import ipaddress
import os
import socket
import sys

_LOG = os.environ.get("CURATE_NETGUARD_LOG")


def _loopback(host) -> bool:
    if host in (None, "", "localhost") or str(host).startswith("/"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost


def _numeric(host) -> bool:
    try:
        ipaddress.ip_address(str(host).split("%")[0])
        return True
    except ValueError:
        return False


def _hook(event, args):
    if event not in ("socket.connect", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg"):
        return
    if event == "socket.getaddrinfo":
        host = args[0]
    else:
        addr = args[1] if len(args) > 1 else None
        host = addr[0] if isinstance(addr, tuple) else addr
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    ok = _loopback(host)
    if not ok and event == "socket.getaddrinfo" and _numeric(host):
        ok = True  # a numeric address resolves locally: no DNS traffic
    if not ok and event == "socket.connect" and getattr(args[0], "type", None) == socket.SOCK_DGRAM:
        ok = True  # connecting a UDP socket sends nothing (used to learn the local IP); sendto is checked
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{'ok' if ok else 'BLOCKED'} {event} {host} pid={os.getpid()} {os.path.basename(sys.argv[0])}\n")
    if not ok:
        raise OSError(f"curate netguard: blocked non-loopback {event} to {host!r}")


if _LOG:
    sys.addaudithook(_hook)
