"""The nftables generation id, asked of the kernel (NFT_MSG_GETGEN), in a namespace the test creates."""

from __future__ import annotations

import socket

import pytest

from topowatch.edges.nftevents import nft_generation
from topowatch.netns import Namespace

pytestmark = [pytest.mark.netns]


def test_a_commit_moves_the_generation(netns: Namespace) -> None:
    before = netns.call(nft_generation)
    assert isinstance(before, int)
    assert netns.call(nft_generation) == before  # asking changes nothing
    netns.run("nft", "add", "table", "inet", "h3gen")
    after = netns.call(nft_generation)
    assert isinstance(after, int) and after != before


def test_no_answer_is_none() -> None:
    def refused() -> socket.socket:
        raise OSError(93, "Protocol not supported")

    assert nft_generation(refused) is None
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with b:
        b.send(b"\0" * 8)  # queued for a: an answer that is no NEWGEN
        assert nft_generation(lambda: a) is None
