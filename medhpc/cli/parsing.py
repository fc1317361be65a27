"""Click parameter types shared by subcommands."""

from __future__ import annotations

import click


class NumberList(click.ParamType):
    """A comma-separated list of ``count`` numbers (``48,48,15``); one number is repeated."""

    name = "list"

    def __init__(self, count: int, kind=float):
        self.count = count
        self.kind = kind

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [item for item in str(value).replace("x", ",").split(",") if item.strip()]
        try:
            numbers = [self.kind(item) for item in items]
        except ValueError:
            self.fail(f"{value!r}: expected {self.count} comma-separated numbers", param, ctx)
        if len(numbers) == 1:
            numbers = numbers * self.count
        if len(numbers) != self.count:
            self.fail(f"{value!r}: expected {self.count} comma-separated numbers", param, ctx)
        if any(n <= 0 for n in numbers):
            self.fail(f"{value!r}: expected positive numbers", param, ctx)
        return tuple(numbers)
