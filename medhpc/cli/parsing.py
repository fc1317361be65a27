"""Click parameter types shared by subcommands."""

from __future__ import annotations

import click

_VALUE_RULES = {
    "positive": (lambda n: n > 0, "positive numbers"),
    "non-negative": (lambda n: n >= 0, "non-negative numbers"),
    "any": (lambda n: True, "numbers"),
}


class NumberList(click.ParamType):
    """A comma-separated list of numbers (``48,48,15``).

    Parameters
    ----------
    count : int or None
        How many numbers (one number is repeated), or ``None`` for one or more.
    kind : type
        ``float`` or ``int``.
    values : {"positive", "non-negative", "any"}
        What each number may be.
    increasing : bool
        Ask for strictly increasing numbers (``low,high``).
    metavar : str
        Shown in ``--help``.
    """

    name = "list"

    def __init__(self, count: int | None, kind=float, values: str = "positive",
                 increasing: bool = False, metavar: str = "list"):
        self.count = count
        self.kind = kind
        self.values = values
        self.increasing = increasing
        self.name = metavar

    def convert(self, value, param, ctx):
        expected = f"{self.count} comma-separated" if self.count else "comma-separated"
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [item for item in str(value).replace("x", ",").split(",") if item.strip()]
        try:
            numbers = [self.kind(item) for item in items]
        except ValueError:
            self.fail(f"{value!r}: expected {expected} numbers", param, ctx)
        if self.count is not None and len(numbers) == 1:
            numbers = numbers * self.count
        if not numbers or (self.count is not None and len(numbers) != self.count):
            self.fail(f"{value!r}: expected {expected} numbers", param, ctx)
        allowed, described = _VALUE_RULES[self.values]
        if not all(allowed(n) for n in numbers):
            self.fail(f"{value!r}: expected {described}", param, ctx)
        if self.increasing and any(a >= b for a, b in zip(numbers, numbers[1:])):
            self.fail(f"{value!r}: expected increasing numbers (low < high)", param, ctx)
        return tuple(numbers)


class NumberListOrWord(NumberList):
    """A :class:`NumberList`, or one of a few words (``--spacing-mm auto``)."""

    def __init__(self, count: int | None, words=("auto",), **options):
        super().__init__(count, **options)
        self.words = tuple(words)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        return super().convert(value, param, ctx)
