# SPDX-License-Identifier: GPL-2.0-or-later
"""The one exception root of topowatch and its kinds.

Every error that can reach a user derives from ``TopowatchError``; the CLI
prints its message as one line and exits 1 (2 for ``UsageError``). Edges
translate library and OS errors into these with ``raise ... from exc``.
This module must never import anything beyond the standard library.
"""

from __future__ import annotations


class TopowatchError(Exception):
    """Root of every error topowatch raises on purpose."""


class UsageError(TopowatchError):
    """The command line or an argument is wrong (exit status 2)."""


class PermissionDenied(TopowatchError):
    """The operation needs privileges (CAP_NET_ADMIN, root) we do not hold."""


class MissingTool(TopowatchError):
    """An external program (nft, iptables-save) is not installed."""


class RulesetError(TopowatchError):
    """A ruleset could not be read or parsed."""


class NetlinkError(TopowatchError):
    """A netlink request failed; ``errno`` holds the kernel's answer."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class DumpInterrupted(NetlinkError):
    """A dump was interrupted (NLM_F_DUMP_INTR): results may be inconsistent."""


class PolicyError(TopowatchError):
    """A policy file is invalid; names the file, line and key."""

    def __init__(self, message: str, *, file: str = "", line: int = 0, key: str = "") -> None:
        where = file
        if line:
            where += f":{line}"
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.line = line
        self.key = key
