"""Tests of medhpc.io, and the check every input error must pass."""

import pytest

from medhpc.errors import InputError


def raises_input_error(path, call, *args, **kwargs) -> str:
    """Run ``call`` and return its InputError message, checked to be one line led by ``path``."""
    with pytest.raises(InputError) as excinfo:
        call(*args, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    return message
