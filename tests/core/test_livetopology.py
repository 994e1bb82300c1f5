"""core.livetopology: which events it follows and where it gives up (table-driven)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from topowatch.core.livetopology import NLM_F_APPEND, NLM_F_REPLACE, LiveTopology
from topowatch.core.model import AF_INET, Address, Link, Nexthop, PolicyRule, Route, RouteList, Topology

UP1 = Nexthop(2, ip_address("198.51.100.1"))
UP2 = Nexthop(3, ip_address("203.0.113.1"))
R1 = Route(ip_network("192.0.2.0/24"), nexthops=(UP1,))
R2 = Route(ip_network("192.0.2.0/24"), nexthops=(UP2,))
V6A = Route(ip_network("2001:db8::/64"), nexthops=(Nexthop(2),), metric=256)
V6B = Route(ip_network("2001:db8::/64"), nexthops=(Nexthop(3),), metric=256)
V6GW = Route(ip_network("2001:db8:1::/64"), nexthops=(Nexthop(2, ip_address("fe80::1")),), metric=1024)
V6GW2 = Route(ip_network("2001:db8:1::/64"), nexthops=(Nexthop(3, ip_address("fe80::2")),), metric=1024)
BASE = Topology((Link(1, "lo"), Link(2, "up1"), Link(3, "up2")), (), (R1, V6A), ())


def live() -> LiveTopology:
    state = LiveTopology.seed(BASE)
    assert state is not None
    return state


@pytest.mark.parametrize(
    ("kind", "new", "value", "flags", "follows", "routes"),
    [
        ("route", True, R2, NLM_F_REPLACE, True, {R2, V6A}),  # replace by key
        ("route", True, R2, 0x600, False, None),  # a new route on a taken key: prepended beside it
        ("route", True, R2, NLM_F_APPEND, False, None),
        ("route", False, R1, 0, True, {V6A}),
        ("route", False, R2, 0, False, None),  # deletes another alias of the key
        ("route", False, Route(ip_network("10.0.0.0/8"), nexthops=(UP1,)), 0, True, {R1, V6A}),  # gone
        ("route", True, V6B, 0x600, True, {R1, V6A, V6B}),  # IPv6: another device lives beside
        ("route", False, V6A, 0, True, {R1}),
        ("route", True, V6B, NLM_F_REPLACE, True, {R1, V6B}),  # IPv6 replace by prefix and metric
        ("address", False, Address(2, ip_address("198.51.100.2"), 24), 0, False, None),  # IPv4 routes go
        ("link", True, Link(3, "up2", up=False), 0, False, None),  # down: IPv4 routes flushed unannounced
        ("link", False, Link(3, "up2"), 0, False, None),
        ("link", True, Link(3, "up2", running=False), 0, True, {R1, V6A}),  # carrier: routes stay
        ("link", True, Link(4, "up3"), 0, True, {R1, V6A}),
    ],
)
def test_events(  # noqa: PLR0917 - a parametrized table
    kind: str, new: bool, value: object, flags: int, follows: bool, routes: set[Route] | None
) -> None:
    state = live()
    assert state.apply(kind, new, value, flags) is follows
    if follows:
        assert set(state.snapshot().routes) == routes


@pytest.mark.parametrize(
    ("new", "address"),
    [(True, Address(2, ip_address("198.51.100.2"), 24)), (True, Address(2, ip_address("fe80::1"), 64)),
     (False, Address(2, ip_address("fe80::1"), 64))],
)
def test_address_events_ask_for_the_cheap_part_only(new: bool, address: Address) -> None:
    state = live()
    assert state.apply("address", new, address)
    assert state.addresses_stale
    cheap = Topology(BASE.links, (address,) if new else (), (), (PolicyRule(AF_INET, 5, table=100),))
    state.refresh(cheap)
    assert not state.addresses_stale
    assert state.snapshot().addresses == cheap.addresses and state.snapshot().rules == cheap.rules
    assert set(state.snapshot().routes) == {R1, V6A}  # routes kept from events


def test_ipv6_gateway_routes_of_one_key_become_siblings_so_it_gives_up() -> None:
    state = live()
    assert state.apply("route", True, V6GW, 0x600)
    assert not state.apply("route", True, V6GW2, 0x600)


def test_a_route_naming_a_nexthop_object_is_not_followed() -> None:
    assert not live().apply("route", True, R2, NLM_F_REPLACE, nexthop_object=True)


def test_rules_are_added_after_their_equals_and_removed_by_value() -> None:
    state = live()
    a, b = PolicyRule(AF_INET, 100, table=100), PolicyRule(AF_INET, 100, table=200)
    assert state.apply("rule", True, a) and state.apply("rule", True, b)
    assert state.snapshot().rules == (a, b)
    assert state.apply("rule", False, a)
    assert state.snapshot().rules == (b,)


def test_a_dump_with_appended_aliases_cannot_seed() -> None:
    assert LiveTopology.seed(Topology(routes=(R1, R2))) is None


def test_the_snapshot_is_kept_until_something_changes() -> None:
    state = live()
    first = state.snapshot()
    assert state.apply("route", True, R1, NLM_F_REPLACE)  # the same route again
    assert state.snapshot() is first
    assert state.apply("route", True, R2, NLM_F_REPLACE)
    assert state.snapshot() is not first


def test_changed_routes_equals_set_difference_on_snapshots_that_share_objects() -> None:
    import random

    from topowatch.core.model import changed_routes

    pool = [Route(ip_network(f"10.{i}.0.0/16")) for i in range(60)]
    rng = random.Random(7)
    for _ in range(2000):
        a = [r for r in pool if rng.random() < 0.5]
        b = list(a)
        for _ in range(rng.randrange(5)):
            op = rng.random()
            fresh = [r for r in pool if r not in b]
            if op < 0.3 and b:
                b.pop(rng.randrange(len(b)))
            elif op < 0.6 and fresh:
                b.insert(rng.randrange(len(b) + 1), rng.choice(fresh))
            elif b:  # the same value, another object (a dump): equal, so unchanged
                i = rng.randrange(len(b))
                b[i] = Route(ip_network(str(b[i].dst)))
        assert changed_routes(a, b) == (set(a) - set(b), set(b) - set(a))


def test_route_changes_follow_the_lineage_of_snapshots() -> None:
    """Between any snapshot and a later one, the routes that differ, without comparing the tables."""
    import random

    from topowatch.core.livetopology import route_changes
    from topowatch.core.model import changed_routes

    rng = random.Random(11)
    pool = [Route(ip_network(f"10.{i}.0.0/16"), nexthops=((UP1, UP2)[i % 2],)) for i in range(40)]
    live = LiveTopology.seed(Topology(BASE.links, (), tuple(pool[:20])))
    assert live is not None
    snapshots = [live.snapshot()]
    for _ in range(300):
        route = rng.choice(pool)
        if rng.random() < 0.4:
            live.apply("route", False, route)
        else:
            live.apply("route", True, Route(route.dst, nexthops=(rng.choice((UP1, UP2)),)), 0x400 | NLM_F_REPLACE)
        if rng.random() < 0.5:
            snapshots.append(live.snapshot())
            older = rng.choice(snapshots[-4:])
            found = route_changes(older.routes, snapshots[-1].routes)
            assert found is not None
            gone, came = changed_routes(older.routes, snapshots[-1].routes)
            assert (set(found[0]), set(found[1])) == (gone, came)
    assert route_changes(snapshots[-1].routes, snapshots[0].routes) is None  # not a descendant


def test_snapshots_list_the_routes_in_the_order_a_dict_keeps_them_sharing_unchanged_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A snapshot's routes (``RouteList``) are the kept routes in insertion order (a replace keeps its
    place, a route added again goes last), through holes and their closing up; chunks no event
    touched are the previous snapshot's own."""
    import random

    from topowatch.core import livetopology
    from topowatch.core.model import RouteList, changed_routes

    monkeypatch.setattr(livetopology, "CHUNK", 4)  # many chunks, holes closed up often
    rng = random.Random(5)
    pool = [Route(ip_network(f"10.{i}.0.0/16"), nexthops=((UP1, UP2)[i % 2],)) for i in range(60)]
    state = LiveTopology.seed(Topology(BASE.links, (), tuple(pool[:30])))
    assert state is not None
    expected = {r.dst: r for r in pool[:30]}  # what a dict in insertion order holds
    before: RouteList | None = None
    lists = 0
    for step in range(600):
        route = rng.choice(pool)
        if rng.random() < 0.45:
            if route.dst in expected:  # the route as kept (another one of its key is not followed)
                assert state.apply("route", False, expected.pop(route.dst))
        else:
            new = Route(route.dst, nexthops=(rng.choice((UP1, UP2)),))
            assert state.apply("route", True, new, 0x400 | NLM_F_REPLACE)
            expected[route.dst] = new
        if step % 3 == 0:
            routes = state.snapshot().routes
            if not isinstance(routes, RouteList):  # the seed's own tuple, until a route changes
                assert routes is state._base.routes
                continue
            lists += 1
            assert len(state._slots) <= 2 * len(expected) + 2 * 4  # holes are closed up: bounded
            assert list(routes) == list(expected.values()) and routes == tuple(expected.values())
            assert len(routes) == len(expected) and hash(routes) == hash(tuple(expected.values()))
            assert [routes[i] for i in range(-len(routes), len(routes))] == list(expected.values()) * 2
            if before is not None:  # by chunks; as the sets of the tables
                assert changed_routes(before, routes) == (set(before) - set(routes), set(routes) - set(before))
                assert list(reversed(routes)) == list(expected.values())[::-1]
            if before is not None and len(before.chunks) == len(routes.chunks):
                changed = sum(a is not b for a, b in zip(before.chunks, routes.chunks, strict=True))
                assert changed <= 3  # at most three events since: three chunks rebuilt
            before = routes
    assert lists > 150


def test_a_route_list_reads_as_the_tuple_of_its_routes() -> None:
    import pickle

    from topowatch.core.model import RouteList

    a, b, c = R1, V6A, V6GW
    routes = RouteList([(a,), (), (b, c), ()])
    assert routes == (a, b, c) and (a, b, c) == routes and routes != (a, b) and routes != (a, c, b)  # noqa: PLR1714 (each operator)
    assert routes == RouteList([(a, b), (c,)]) and routes != RouteList([(a, b)])
    assert routes[1:] == (b, c) and routes[-1] is c and routes[1] is b and routes + (a,) == (a, b, c, a)  # noqa: RUF005 (its +)
    assert pickle.loads(pickle.dumps(routes)) == routes
    assert repr(routes) == repr((a, b, c))  # it reads as the tuple of its routes, in logs too
    assert Topology(routes=routes).routes is routes and Topology(routes=routes) == Topology(routes=(a, b, c))
    with pytest.raises(IndexError):
        routes[3]
    assert RouteList([]) == () and len(RouteList([(), ()])) == 0


# -- the tenth session: an event of another kind than it names, the count, the seeded snapshot ------

RULE = PolicyRule(AF_INET, 100, table=100)
ADDRESS = Address(2, ip_address("198.51.100.2"), 24)
NEW_ROUTE = Route(ip_network("10.0.0.0/8"), nexthops=(UP1,))  # at a key not taken: followed as a route


@pytest.mark.parametrize(
    ("kind", "value"),
    [("address", Link(4, "up3")), ("link", NEW_ROUTE), ("link", RULE), ("link", ADDRESS), ("nexthop", NEW_ROUTE),
     ("neighbour", object())],
)
def test_an_event_whose_value_is_not_of_its_kind_is_not_followed(kind: str, value: object) -> None:
    """Each kind is applied only to a value of its type; anything else (nexthop objects, kinds not
    modelled) asks for a dump and changes nothing (the ninth run: ``apply`` 6, 14, 25, 33 (``or``
    for ``and``) and 44 (True at the end) survived)."""
    state = live()
    before = state.snapshot()
    assert state.apply(kind, True, value) is False
    assert state.snapshot() is before
    assert state.addresses_stale is False


def test_every_event_is_counted() -> None:
    """``applied`` counts the events given, followed or not (the ninth run: ``apply`` 3-5 survived)."""
    state = live()
    assert state.applied == 0
    state.apply("route", True, R2, NLM_F_REPLACE)
    state.apply("nexthop", True, object())
    state.apply("link", True, Link(4, "up3"))
    assert state.applied == 3


def test_the_seeded_snapshot_holds_its_routes_in_the_chunks_later_snapshots_share() -> None:
    """The dump's snapshot is the dump with its routes as a ``RouteList`` of the seeded chunks, which
    a later snapshot shares where unchanged (the ninth run: ``seed`` 22, the dump itself handed out
    with its tuple of routes, survived)."""
    first = live().snapshot()
    assert isinstance(first.routes, RouteList)
    assert list(first.routes) == [R1, V6A]
    assert (first.links, first.addresses, first.rules) == (BASE.links, BASE.addresses, BASE.rules)
    state = live()
    seeded = state.snapshot().routes
    state.apply("link", True, Link(4, "up3"))
    later = state.snapshot().routes
    assert isinstance(seeded, RouteList) and isinstance(later, RouteList)
    assert all(a is b for a, b in zip(seeded.chunks, later.chunks, strict=True))
