"""A network guard for tests: put this folder first on PYTHONPATH and every Python process started with that
environment (DataLoader workers and other children included) refuses connections and name lookups that leave
the machine. Unix sockets and loopback stay usable. Each refused attempt is appended to the file named by
QCTRAIN_NETGUARD_LOG (pid, what, where) and raises OSError, so a test fails on any attempt, telemetry included.
tests/isolation.py adds a network namespace (unshare -n) where it can, for what Python does not see."""

import errno
import ipaddress
import os
import socket
import traceback

_LOG = os.environ.get("QCTRAIN_NETGUARD_LOG")
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _record(what: str, where) -> None:
    if _LOG:
        caller = traceback.extract_stack(limit=6)[0]
        with open(_LOG, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {what} {where!r} from {caller.filename}:{caller.lineno}\n")


def _local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in (None, "", "localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str, where):
    _record(what, where)
    raise OSError(errno.ENETUNREACH, f"network access blocked by the test's guard: {what} {where!r}")


def _guarded(method):
    def guarded(self, address, *args):
        if self.family in _IP_FAMILIES and not _local(address[0] if isinstance(address, tuple) else address):
            _refuse(method.__name__, address)
        return method(self, address, *args)
    return guarded


def _guarded_sendto(method):
    def sendto(self, data, *args):
        address = args[-1]
        if self.family in _IP_FAMILIES and isinstance(address, tuple) and not _local(address[0]):
            _refuse("sendto", address)
        return method(self, data, *args)
    return sendto


def _guarded_lookup(function):
    def lookup(host, *args, **kwargs):
        if not _local(host):
            _record(function.__name__, host)
            raise socket.gaierror(socket.EAI_NONAME, f"name lookup blocked by the test's guard: {host!r}")
        return function(host, *args, **kwargs)
    return lookup


socket.socket.connect = _guarded(socket.socket.connect)
socket.socket.connect_ex = _guarded(socket.socket.connect_ex)
socket.socket.sendto = _guarded_sendto(socket.socket.sendto)
for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
    setattr(socket, _name, _guarded_lookup(getattr(socket, _name)))
