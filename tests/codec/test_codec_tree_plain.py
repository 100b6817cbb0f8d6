"""The tree codec's plain-atom fast paths: the same bytes, refusals and depth limits as per item."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from collectives.codec import CodecOptions, dumps, loads, tree
from collectives.codec.refs import OOB_MIN_BYTES, Collector
from collectives.errors import CodecError


def _dump(obj: object, max_depth: int = 256) -> bytes:
    return tree.dump(obj, Collector(CodecOptions()), max_depth)


def test_plain_containers_encode_as_msgpack_itself() -> None:
    obj = {
        "ints": list(range(-5, 1000)),
        "floats": [i / 7 for i in range(1000)],
        "mixed": ["a", 1.5, None, True, b"x" * (OOB_MIN_BYTES - 1), 2**64 - 1, -(2**63)],
        "map": {str(i): i for i in range(100)},
        7: {None: 0.5, b"k": "v", False: 2**63},
    }
    assert _dump(obj) == msgpack.packb(obj, use_bin_type=True)
    assert loads(dumps(obj)) == obj


@pytest.mark.parametrize("big", [2**64, -(2**63) - 1, 2**200])
def test_ints_past_msgpack_range_still_become_big_int_extensions(big: int) -> None:
    for items in ([1, 2, big], [big], [True, big], ["s", big], {1: big}, {big: 1}, (0, big)):
        converted: Any = tree.to_tree(items, 256)
        leaves = converted.values() if isinstance(converted, dict) else converted
        keys = converted.keys() if isinstance(converted, dict) else []
        found = [x for x in [*leaves, *keys] if isinstance(x, msgpack.ExtType)]
        assert any(x.code == tree.EXT_BIGINT for x in found), items
        assert loads(dumps(items)) == items


def test_bytes_past_the_out_of_band_size_still_travel_out_of_band() -> None:
    small, large = b"s" * (OOB_MIN_BYTES - 1), b"L" * OOB_MIN_BYTES
    collector = Collector(CodecOptions())
    tree.dump([small, large, small], collector, 256)
    assert [bytes(b.view) for b in collector.buffers] == [large]
    collector = Collector(CodecOptions())
    tree.dump({large: 1}, collector, 256)  # as a key it stays in the document
    assert collector.buffers == []
    assert loads(dumps([small, large, {large: small}])) == [small, large, {large: small}]


def test_encoder_refuses_the_first_bad_item_among_plain_ones() -> None:
    with pytest.raises(tree.Unfit, match=r"builtins\.set"):
        _dump([*range(10_000), {1}, 3j, *range(10)])
    keyed: dict[object, object] = {str(i): i for i in range(100)}
    with pytest.raises(tree.Unfit, match=r"builtins\.complex as a dict key"):
        _dump({**keyed, ("a", 3j): 1})


def test_depth_limits_hold_for_containers_of_plain_atoms() -> None:
    assert _dump([[1, 2], ("a",), {"k": 1.0}], max_depth=2)
    with pytest.raises(tree.Unfit, match="max_depth=1"):
        _dump([[1, 2]], max_depth=1)
    with pytest.raises(tree.Unfit, match="max_depth=1"):
        _dump({"k": {"a": 1}}, max_depth=1)
    tree.check([[1, 2], ("a",), {"k": 1.0}], 2)
    for obj in ([[1, 2]], [(1,)], [{"a": 1}], {(1,): 1}):
        with pytest.raises(CodecError, match="max_depth=1"):
            tree.check(obj, 1)


def test_check_refuses_a_forbidden_leaf_among_many_plain_ones() -> None:
    plain: list[object] = [*range(50_000), "s", 1.5, None, True, b"b", 2**100]
    keyed: dict[object, object] = dict.fromkeys(range(100))
    tree.check({"a": plain, "b": tuple(plain), 1: {str(i): i for i in range(100)}}, 256)
    cases: list[tuple[object, str]] = [
        ([*plain, msgpack.Timestamp(1, 0)], "forbidden Timestamp$"),
        ({**keyed, "x": msgpack.ExtType(9, b"")}, "forbidden ExtType$"),
        ({**keyed, (1, 3j): None}, "forbidden complex as a dict key"),
        ({**keyed, (1, (2,)): 3j}, "^"),  # a complex value is allowed
    ]
    for obj, message in cases[:3]:
        with pytest.raises(CodecError, match=message):
            tree.check(obj, 256)
    tree.check(cases[3][0], 256)
    # With several faults the last one stacked is met first, as before the fast paths.
    with pytest.raises(CodecError, match="forbidden ExtType"):
        tree.check([msgpack.Timestamp(1, 0), *plain, msgpack.ExtType(9, b"")], 256)
