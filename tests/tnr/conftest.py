"""TNR test data: small phantom stacks with ground truth (made once per run)."""

import h5py
import pytest

from medhpc.parallel.comm import World, _SerialComm
from medhpc.phantoms.tnr import TnrPhantomSettings, write_tnr_phantom
from medhpc.runtime.context import start_run
from medhpc.tnr.run import StackRegistration
from medhpc.tnr.settings import MatchSettings, TnrSettings

SETTINGS = TnrSettings(sigma=2.0, match=MatchSettings(patch=32, search=10, grid=16))
PHANTOM = TnrPhantomSettings(sections=12, size=128, seed=0)


def serial_run(command="tnr-register", device="cpu", overwrite=True):
    """A one-rank run, also inside an MPI job (for reference results)."""
    return start_run(command, device=device, verbosity=-1, overwrite=overwrite,
                     world=World(_SerialComm()))


def register(source, out, settings=SETTINGS, run=None, **options):
    """Run tnr-register in this process; return the displacement fields (2, z, y, x) and the
    registered volume."""
    fields = out.with_name(out.name.replace(".h5", "-fields.h5"))
    StackRegistration(run or serial_run(), source, out, settings, fields=fields,
                   **options).execute()
    with h5py.File(fields, "r") as h5:
        displacement = h5["displacement"][()]
    with h5py.File(out, "r") as h5:
        volume = h5["volume"][()]
    return displacement, volume


@pytest.fixture(scope="session")
def phantom_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tnr_phantom")
    write_tnr_phantom(folder, PHANTOM)
    return folder


@pytest.fixture(scope="session")
def damaged_folder(tmp_path_factory):
    """Ten sections, section 4 blank (empty glass) and section 7 in another stain."""
    folder = tmp_path_factory.mktemp("tnr_damaged")
    write_tnr_phantom(folder, TnrPhantomSettings(sections=10, size=128, seed=1, blank=(4,),
                                                 restain=(7,)))
    return folder
