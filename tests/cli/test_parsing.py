"""Comma-separated number options."""

import click
import pytest

from medhpc.cli.parsing import NumberList


def test_fixed_count_repeats_one_number_and_needs_positive_values():
    assert NumberList(3, int).convert("48", None, None) == (48, 48, 48)
    assert NumberList(3).convert("1.5,2,2", None, None) == (1.5, 2.0, 2.0)
    for bad in ("1,2", "a,b,c", "0,1,1"):
        with pytest.raises(click.BadParameter):
            NumberList(3).convert(bad, None, None)


def test_any_length_non_negative_integers():
    kind = NumberList(None, int, values="non-negative")
    assert kind.convert("40,20,0", None, None) == (40, 20, 0)
    for bad in ("", "-1", "2.5"):
        with pytest.raises(click.BadParameter):
            kind.convert(bad, None, None)


def test_increasing_pair_of_any_sign():
    kind = NumberList(2, values="any", increasing=True, metavar="low,high")
    assert kind.convert("-1000,1000", None, None) == (-1000.0, 1000.0)
    assert kind.name == "low,high"
    for bad in ("1000,-1000", "5", "1,2,3"):
        with pytest.raises(click.BadParameter):
            kind.convert(bad, None, None)
