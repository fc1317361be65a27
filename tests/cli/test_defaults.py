"""Defaults live once, in each application's settings module; the command line reads them."""

from dataclasses import dataclass, field, fields

import pytest

from medhpc.cli.main import cli
from medhpc.cli.options import default_of
from medhpc.ct.settings import TrainSettings
from medhpc.io.pyramid import COMPRESSIONS
from medhpc.lddmm.settings import Settings
from medhpc.pet.settings import ReconSettings
from medhpc.tnr.settings import OUTPUT_COMPRESSIONS, MatchSettings, OutputSettings, TnrSettings

# option name -> setting name where the two differ
RENAMED = {"beta": "rdp_beta", "fluid_sigma": "fluid_sigma_mm",
           "diffusion_sigma": "diffusion_sigma_mm", "max_angle": "max_angle_deg"}
COMMANDS = {
    "pet-recon": [ReconSettings],
    "lddmm": [Settings],
    "tnr-register": [TnrSettings, MatchSettings, OutputSettings],
    "ct-train": [TrainSettings],
}


def _field_defaults(settings_classes) -> dict:
    defaults = {}
    for settings in settings_classes:
        for item in fields(settings):
            defaults.setdefault(item.name, default_of(settings, item.name))
    return defaults


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_named_after_a_setting_shows_the_settings_default(name):
    defaults = _field_defaults(COMMANDS[name])
    command = cli.commands[name]
    checked = 0
    for parameter in command.params:
        setting = RENAMED.get(parameter.name, parameter.name)
        if name == "pet-recon" and parameter.name == "gamma":
            setting = "rdp_gamma"
        if setting not in defaults or parameter.default is None or getattr(
                parameter, "is_flag", False) and not getattr(parameter, "secondary_opts", None):
            continue  # plain flags are off by default
        expected = defaults[setting]
        shown = parameter.default
        if isinstance(expected, tuple) and isinstance(shown, str):  # --widths 8,16,32,64
            shown = tuple(int(part) for part in shown.split(","))
        assert shown == expected, f"{name} --{parameter.name}: {shown!r} != {expected!r}"
        checked += 1
    assert checked >= 4


def test_default_of_reads_plain_and_factory_defaults():
    @dataclass
    class Example:
        plain: int = 3
        made: list = field(default_factory=lambda: [1, 2])

    assert default_of(Example, "plain") == 3
    assert default_of(Example, "made") == [1, 2]
    with pytest.raises(KeyError, match="no setting 'other'"):
        default_of(Example, "other")


def test_tnr_compression_choices_are_the_pyramid_writers_codecs():
    assert OUTPUT_COMPRESSIONS == ("auto",) + COMPRESSIONS
