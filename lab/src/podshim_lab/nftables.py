"""Delete one nf_tables table over netlink (what ``nft delete table <family> <name>`` does).

``iptables-nft`` creates a table (``ip nat``, ``ip6 nat``...) with its base chains the
first time a command touches it, and has no command that removes it again: emptying it
leaves the table and its hooks registered. The host-network guard of the lab
(:mod:`podshim_lab.hostnet`) removes a table that did not exist before the lab ran,
once it is empty; this module is the one netlink message that needs, so no ``nft``
binary is required.

The message is a batch (``NFNL_MSG_BATCH_BEGIN``, ``NFT_MSG_DELTABLE`` with the table
name, ``NFNL_MSG_BATCH_END``) on a ``NETLINK_NETFILTER`` socket; the kernel acks the
delete or answers with an errno.
"""

from __future__ import annotations

import os
import socket
import struct

__all__ = ["FAMILIES", "NftError", "delete_table"]

NETLINK_NETFILTER = 12
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_DELTABLE = 2
NFTA_TABLE_NAME = 1
#: iptables' family names to nf_tables' protocol families (NFPROTO_IPV4, NFPROTO_IPV6)
FAMILIES = {"ipv4": 2, "ipv6": 10}

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian inside)
_NLATTR = struct.Struct("=HH")  # len, type


class NftError(OSError):
    """The kernel refused the delete (the errno is the kernel's)."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def _message(msg_type: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    payload = _NFGENMSG.pack(family, 0, socket.htons(res_id)) + body
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, flags, seq, 0) + payload


def _attr_string(attr_type: int, value: str) -> bytes:
    raw = value.encode() + b"\0"
    length = _NLATTR.size + len(raw)
    return _NLATTR.pack(length, attr_type) + raw + b"\0" * (_align(length) - length)


def delete_table_request(family: int, name: str, seq: int) -> bytes:
    """The batch that deletes table ``name`` of ``family``; the delete has ``seq``."""
    begin = _message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq - 1, 0, NFNL_SUBSYS_NFTABLES, b"")
    delete = _message(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family,
        0,
        _attr_string(NFTA_TABLE_NAME, name),
    )
    end = _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 1, 0, NFNL_SUBSYS_NFTABLES, b"")
    return begin + delete + end


def ack_errno(data: bytes, seq: int) -> int | None:
    """The errno of the ack for ``seq`` in a netlink reply (0: done), ``None`` if absent."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        if msg_type == NLMSG_ERROR and msg_seq == seq:
            (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
            return -int(code)
        offset += _align(length)
    return None


def delete_table(family: str, name: str, timeout: float = 10.0) -> None:
    """Delete table ``name`` of ``family`` ("ipv4" or "ipv6"), its chains with it.

    Raises :class:`NftError` with the kernel's errno (``ENOENT``: no such table).
    """
    seq = int.from_bytes(os.urandom(3), "little") + 2
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(delete_table_request(FAMILIES[family], name, seq))
        while True:
            code = ack_errno(sock.recv(65536), seq)
            if code is not None:
                break
    if code != 0:
        raise NftError(code, f"delete table {family} {name}: {os.strerror(code)}")
