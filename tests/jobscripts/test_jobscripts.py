"""Every job script in jobscripts/ runs for real on a tiny problem.

The scheduler is played by its environment variables (SLURM_*, PBS_*, PJM_*) and by the
stand-ins in ``standins/`` put first on PATH: ``srun``, a site ``mpirun`` and ``mpiexec``,
``apptainer``/``singularity`` (runs the command after the image on the host). Every launch
ends in the venv's ``mpiexec -n 2``. ``medhpc`` on PATH is a wrapper that records the
environment each rank sees, then runs the installed medhpc. Every script hands over to
``bin/medhpc-job``; the cases find it each of the ways a job does (``MEDHPC_JOB``, in
``MEDHPC_VENV``, on PATH, in the submit folder's ``bin/``).

Workloads: every script writes a tiny PET phantom (``phantom pet``, 7 x 24 x 24); the
Slurm container script runs a 1-iteration, 2-subset ``pet-recon`` of a tiny simulated
sinogram (small-test scanner) instead: it compiles the projector into a node-local numba
cache (~20 s on 2 cores), so only one script does. Should the simulation fail (the PET code
is changing), that script runs ``phantom pet`` too and a warning says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import mpiexec, run_medhpc

ROOT = Path(__file__).resolve().parents[2]
JOBSCRIPTS = ROOT / "jobscripts"
LAUNCHER = ROOT / "bin" / "medhpc-job"
STANDINS = Path(__file__).resolve().parent / "standins"
SCRIPTS = sorted(JOBSCRIPTS.glob("*.sh"))
RANKS = 2
JOB_ID = "4242"  # the same in every case: the node-local numba cache is compiled once
TIMEOUT = 120
PHANTOM_ARGS = ["--shape", "7,24,24", "--voxel-mm", "4,4,2"]
ENV_RECORD = ("NUMBA_CACHE_DIR", "HDF5_USE_FILE_LOCKING", "MEDHPC_THREADS", "OMP_NUM_THREADS",
              "MPLCONFIGDIR", "PYTHONNOUSERSITE", "XDG_CACHE_HOME", "VIRTUAL_ENV")


@dataclass
class Case:
    """How a scheduler starts one script, and what its run must show."""

    script: str
    launcher: str                   # first word of every launch (the stand-in's name)
    env: dict                       # scheduler variables; values may use {work} {tmp} {nodes}
    by_args: bool = True            # subcommand as arguments (else in MEDHPC_ARGS)
    container: str | None = None    # runtime the script calls, when it runs an image
    gpu: bool = False               # container started with --nv
    threads: int = 1
    recon: bool = False             # run pet-recon (else phantom pet)
    lookup: str = "env"             # how medhpc-job is found: env, venv, path, workdir (none)
    launcher_words: list = field(default_factory=list)


CASES = [
    Case("slurm-gpu.sh", "srun", {"SLURM_JOB_ID": JOB_ID, "SLURM_NTASKS": "2",
                                  "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": "{work}"},
         launcher_words=["--mpi=pmix"], lookup="venv"),
    Case("slurm-cpu.sh", "srun", {"SLURM_JOB_ID": JOB_ID, "SLURM_NTASKS": "2",
                                  "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": "{work}"},
         launcher_words=["--mpi=pmix"], lookup="path"),
    Case("slurm-gpu-apptainer.sh", "srun",
         {"SLURM_JOB_ID": JOB_ID, "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "1",
          "SLURM_SUBMIT_DIR": "{work}"},
         container="apptainer", gpu=True, recon=True, launcher_words=["--mpi=pmi2"]),
    Case("pbs-gpu.sh", "mpirun", {"PBS_JOBID": JOB_ID, "PBS_O_WORKDIR": "{work}",
                                  "PBS_NODEFILE": "{nodes}", "OMP_NUM_THREADS": "1"},
         by_args=False, launcher_words=["-np", "2"], lookup="workdir"),
    Case("pbs-gpu-singularity.sh", "mpirun",
         {"PBS_JOBID": JOB_ID, "PBS_O_WORKDIR": "{work}", "PBS_NODEFILE": "{nodes}",
          "OMP_NUM_THREADS": "1"},
         by_args=False, container="singularity", gpu=True, launcher_words=["-np", "2"]),
    Case("pjm-flow-type2.sh", "mpirun",
         {"PJM_JOBID": JOB_ID, "PJM_O_WORKDIR": "{work}", "PJM_O_NODEINF": "{nodes}",
          "PJM_MPI_PROC": "2", "PJM_LOCALTMP": "{tmp}", "MEDHPC_THREADS": "1"},
         by_args=False, launcher_words=["-machinefile", "-npernode", "-x", "MEDHPC_THREADS"]),
    Case("pjm-flow-type2-singularity.sh", "mpirun",
         {"PJM_JOBID": JOB_ID, "PJM_O_WORKDIR": "{work}", "PJM_O_NODEINF": "{nodes}",
          "PJM_MPI_PROC": "2", "PJM_LOCALTMP": "{tmp}", "MEDHPC_THREADS": "1"},
         by_args=False, container="singularity", gpu=True,
         launcher_words=["-machinefile", "-x", "NUMBA_CACHE_DIR"]),
    Case("pjm-fugaku.sh", "mpiexec",
         {"PJM_JOBID": JOB_ID, "PJM_O_WORKDIR": "{work}", "PJM_MPI_PROC": "2",
          "PJM_LOCALTMP": "{tmp}", "MEDHPC_THREADS": "1"},
         by_args=False, launcher_words=["-n", "2"]),
    Case("local.sh", "mpiexec", {"MEDHPC_RANKS": "2", "MEDHPC_THREADS": "1"},
         launcher_words=["-n", "2"]),
]


def test_every_script_has_a_case():
    assert sorted(case.script for case in CASES) == sorted(path.name for path in SCRIPTS)


PHANTOM = (["phantom", "pet", "--out", "phantom", *PHANTOM_ARGS], "phantom/activity.nii.gz")


@pytest.fixture(scope="session")
def recon_workload(tmp_path_factory):
    """pet-recon arguments and output on a tiny simulated sinogram (or the phantom workload)."""
    data = tmp_path_factory.mktemp("data")
    phantom = data / "phantom"
    done = run_medhpc("phantom", "pet", "--out", phantom, *PHANTOM_ARGS, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    sinogram = data / "sinogram.h5"
    simulated = run_medhpc("pet-simulate", "--activity", phantom / "activity.nii.gz",
                           "--mu-map", phantom / "mu_map.nii.gz", "--scanner", "small-test",
                           "--counts", "1e5", "--device", "cpu", "--out", sinogram,
                           timeout=TIMEOUT)
    if simulated.returncode == 0:
        return (["pet-recon", "--sinogram", str(sinogram), "--out", "recon.nii.gz",
                 "--iterations", "1", "--subsets", "2"], "recon.nii.gz")
    warnings.warn("pet-simulate failed, job scripts run 'phantom pet' instead of pet-recon:\n"
                  + simulated.stderr[-2000:])
    return PHANTOM


@pytest.fixture(scope="session")
def node_tmp(tmp_path_factory):
    """The node-local scratch every case shares (TMPDIR, PJM_LOCALTMP)."""
    return tmp_path_factory.mktemp("node-tmp")


def medhpc_wrapper(folder: Path, record: Path) -> None:
    """Put a ``medhpc`` on PATH that records each process's environment, then runs medhpc."""
    real = Path(sys.executable).parent / "medhpc"
    lines = ["#!/bin/bash", '{ echo "$*"'] + [
        f'  echo "{name}=${{{name}-<unset>}}"' for name in ENV_RECORD] + [
        f'}} > "{record}/$$.txt"', f'exec "{real}" "$@"']
    wrapper = folder / "medhpc"
    wrapper.write_text("\n".join(lines) + "\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)


def job_environment(tmp_path: Path, node_tmp: Path, extra: dict,
                    lookup: str = "env") -> tuple[dict, dict]:
    """A bare environment for one job plus the paths it uses.

    ``lookup`` is where the job script finds medhpc-job: ``env`` (MEDHPC_JOB), ``venv`` (in
    MEDHPC_VENV's bin/, a stand-in virtual environment), ``path`` (on PATH), ``workdir`` (the
    submit folder's bin/, as in a checkout) or ``none`` (nowhere).
    """
    paths = {"work": tmp_path / "work", "bin": tmp_path / "bin", "tmp": node_tmp,
             "nodes": tmp_path / "nodefile", "log": tmp_path / "launches.log",
             "record": tmp_path / "ranks", "image": tmp_path / "work" / "medhpc.sif",
             "venv": tmp_path / "venv"}
    for name in ("work", "bin", "record"):
        paths[name].mkdir()
    paths["nodes"].write_text("node0\n" * RANKS)
    medhpc_wrapper(paths["bin"], paths["record"])
    env = {"PATH": os.pathsep.join([str(STANDINS), str(paths["bin"]), "/usr/bin", "/bin"]),
           "HOME": str(tmp_path), "TMPDIR": str(node_tmp), "LANG": "C.UTF-8",
           "MEDHPC_STANDIN_MPIEXEC": mpiexec(), "MEDHPC_STANDIN_LOG": str(paths["log"]),
           "MPIEXEC_TIMEOUT": str(TIMEOUT)}
    if lookup == "env":
        env["MEDHPC_JOB"] = str(LAUNCHER)
    elif lookup in ("venv", "path", "workdir"):
        folder = {"venv": paths["venv"] / "bin", "path": paths["bin"],
                  "workdir": paths["work"] / "bin"}[lookup]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "medhpc-job").symlink_to(LAUNCHER)
        if lookup == "venv":
            (folder / "activate").write_text(f'export VIRTUAL_ENV="{paths["venv"]}"\n')
            env["MEDHPC_VENV"] = str(paths["venv"])
    for name, value in extra.items():
        env[name] = value.format(work=paths["work"], tmp=node_tmp, nodes=paths["nodes"])
    return env, paths


def run_script(script: str, args: list, env: dict, cwd: Path, by_args: bool = True):
    if not by_args:
        env = dict(env, MEDHPC_ARGS=" ".join(args))
        args = []
    return subprocess.run(["bash", str(JOBSCRIPTS / script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT)


def rank_records(folder: Path) -> list[dict]:
    """The environment each medhpc process saw."""
    records = []
    for path in folder.iterdir():
        argv, *lines = path.read_text().splitlines()
        records.append(dict(line.partition("=")[::2] for line in lines) | {"argv": argv})
    return records


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.script)
def test_job_script_runs(case, request, node_tmp, tmp_path):
    args, output = request.getfixturevalue("recon_workload") if case.recon else PHANTOM
    env, paths = job_environment(tmp_path, node_tmp, case.env, case.lookup)
    if case.container:
        paths["image"].write_bytes(b"stand-in image")
    # Submitted from elsewhere: the script must go to the job's working folder itself
    # (the local script runs where it is started).
    cwd = paths["work"] if case.script == "local.sh" else tmp_path
    done = run_script(case.script, args, env, cwd, case.by_args)
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report

    # The environment report comes first, from all ranks.
    assert done.stdout.index(f"ranks: {RANKS} on 1 node(s)") < done.stdout.index("finished")
    assert f"{case.threads} thread(s) per rank" in done.stdout
    assert (paths["work"] / output).is_file(), report
    if output == "recon.nii.gz":
        log = json.loads((paths["work"] / "recon.json").read_text())
        assert log, "empty pet-recon log"

    launches = paths["log"].read_text().splitlines()
    host = [line for line in launches if line.split()[0] == case.launcher]
    assert len(host) == 2, launches  # info, then the subcommand
    for word in case.launcher_words:
        assert word in host[0].split(), host[0]
    assert host[0].endswith(" info") and args[0] in host[1]
    inside = [line for line in launches if line.split()[0] in ("apptainer", "singularity")]
    if case.container:
        # one container per rank, for info and for the subcommand
        assert len(inside) == 2 * RANKS, launches
        assert all(line.split()[0] == case.container for line in inside)
        assert all(("--nv" in line.split()) == case.gpu for line in inside)
        assert all(str(paths["image"]) in line.split() for line in inside)
    else:
        assert not inside, launches

    records = rank_records(paths["record"])
    assert len(records) == 2 * RANKS
    for record in records:
        assert record["HDF5_USE_FILE_LOCKING"] == "FALSE"
        assert record["MEDHPC_THREADS"] == str(case.threads) == record["OMP_NUM_THREADS"]
        assert record["NUMBA_CACHE_DIR"] == f"{node_tmp}/medhpc-numba-{JOB_ID}" or (
            case.script == "local.sh" and record["NUMBA_CACHE_DIR"].startswith(str(node_tmp)))
        if case.container:
            assert record["PYTHONNOUSERSITE"] == "1"
            assert record["XDG_CACHE_HOME"].startswith(str(node_tmp))
        if case.lookup == "venv":  # medhpc-job activated the virtual environment
            assert record["VIRTUAL_ENV"] == str(paths["venv"])


def test_missing_subcommand_is_a_usage_error(node_tmp, tmp_path):
    env, paths = job_environment(tmp_path, node_tmp, {"SLURM_JOB_ID": JOB_ID,
                                                      "SLURM_SUBMIT_DIR": "{work}"})
    done = run_script("slurm-gpu.sh", [], env, tmp_path)
    assert done.returncode == 2
    assert "usage: sbatch jobscripts/slurm-gpu.sh SUBCOMMAND" in done.stderr
    assert not paths["log"].exists()  # nothing was launched


@pytest.mark.parametrize("where", ["none", "MEDHPC_JOB"])
def test_missing_launcher_is_one_clear_line(where, node_tmp, tmp_path):
    """No medhpc-job anywhere (or MEDHPC_JOB names a missing file): exit 2, one line."""
    env, paths = job_environment(tmp_path, node_tmp, {"SLURM_JOB_ID": JOB_ID,
                                                      "SLURM_SUBMIT_DIR": "{work}"}, "none")
    missing = tmp_path / "nowhere" / "medhpc-job"
    if where == "MEDHPC_JOB":
        env["MEDHPC_JOB"] = str(missing)
    done = run_script("slurm-gpu.sh", ["info"], env, tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "not found" in lines[0] and "MEDHPC_JOB" in lines[0], done.stderr
    expected = missing if where == "MEDHPC_JOB" else paths["work"] / "bin" / "medhpc-job"
    assert str(expected) in lines[0]
    assert not paths["log"].exists()


def test_missing_image_is_reported_before_launch(node_tmp, tmp_path):
    env, paths = job_environment(tmp_path, node_tmp, {"SLURM_JOB_ID": JOB_ID, "SLURM_NTASKS": "2",
                                                      "SLURM_SUBMIT_DIR": "{work}"})
    done = run_script("slurm-gpu-apptainer.sh", ["info"], env, tmp_path)
    assert done.returncode == 2
    assert "medhpc.sif not found" in done.stderr
    assert not paths["log"].exists()


def test_injected_failure_ends_the_job(node_tmp, tmp_path):
    """MEDHPC_FAIL_ON_RANK=1 brings the whole job down with exit 1 (no hang)."""
    env, paths = job_environment(tmp_path, node_tmp, {"MEDHPC_RANKS": "2", "MEDHPC_THREADS": "1",
                                                      "MEDHPC_FAIL_ON_RANK": "1"})
    done = run_script("local.sh", ["pet-simulate", "--activity", "missing.nii.gz", "--scanner",
                                   "small-test", "--out", "s.h5"], env, paths["work"])
    assert done.returncode != 0
    assert "failed (exit" in done.stderr or "usage or input error" in done.stderr


def test_checkpoint_exit_asks_for_resume(node_tmp, tmp_path):
    """Exit 143 (checkpoint saved on SIGTERM/SIGUSR1) is passed on with a resubmit hint."""
    env, paths = job_environment(tmp_path, node_tmp, {"MEDHPC_RANKS": "2", "MEDHPC_THREADS": "1"})
    fake = paths["bin"] / "fake-medhpc"
    fake.write_text('#!/bin/bash\n[ "$1" = info ] && exit 0\nexit 143\n')
    fake.chmod(0o755)
    done = run_script("local.sh", ["pet-recon"], dict(env, MEDHPC_BIN=str(fake)), paths["work"])
    assert done.returncode == 143
    assert "--resume" in done.stderr


def hand_over(path: Path) -> str:
    """The end of a job script, from ``# ---- hand over`` to its last line."""
    text = path.read_text()
    match = re.search(r"^# ---- hand over to medhpc-job.*\Z", text, re.M | re.S)
    assert match, f"{path.name}: no hand-over to medhpc-job"
    return match.group(0)


def handed_over(block: str) -> set:
    """The MEDHPC_* names the hand-over's ``export`` statement passes to medhpc-job."""
    match = re.search(r"^export .*?[^\\]\n", block, re.M | re.S)
    assert match, "no export in the hand-over"
    return set(re.findall(r"MEDHPC_\w+", match.group(0)))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_script_hands_over_to_medhpc_job(path):
    """The job runs in bin/medhpc-job: the script only sets what its scheduler says."""
    text = path.read_text()
    block = hand_over(path)
    assert block.rstrip().splitlines()[-1] == 'exec "$job" "$@"'
    assert block == hand_over(JOBSCRIPTS / "slurm-gpu.sh"), "hand-over differs from slurm-gpu.sh"
    for shared in ("compgen -e", "HDF5_USE_FILE_LOCKING", '"${launcher[@]}"'):
        assert shared not in text, f"{shared!r}: that belongs in bin/medhpc-job"
    # Every setting the script makes reaches medhpc-job.
    for name in set(re.findall(r"^(MEDHPC_\w+)=", text, re.M)):
        assert name in handed_over(block), f"{name} is set but not handed over"


def test_medhpc_job_reads_what_is_handed_over():
    text = LAUNCHER.read_text()
    assert text.startswith("#!/bin/bash\n") and os.access(LAUNCHER, os.X_OK)
    for name in handed_over(hand_over(JOBSCRIPTS / "slurm-gpu.sh")):
        assert f"${{{name}" in text, f"medhpc-job ignores {name}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_header_says_how_to_submit_and_what_to_edit(path):
    text = path.read_text()
    header = text.split("set -euo pipefail")[0]
    assert text.startswith("#!/bin/bash\n")
    assert re.search(r"^# (Submit|Run):", header, re.M), "no submit line in the header"
    assert re.search(r"^# Edit:", header, re.M), "no edit line in the header"
    assert "143" in header and "--resume" in header
    assert os.access(path, os.X_OK), "not executable"
    directive = {"slurm": "#SBATCH", "pbs": "#PBS", "pjm": "#PJM"}.get(path.name.split("-")[0])
    if directive:
        assert directive in header


def test_shellcheck():
    checker = shutil.which("shellcheck")
    if checker is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck): scripts not linted")
    files = [str(path) for path in SCRIPTS] + [str(LAUNCHER)]
    files += [str(path) for path in STANDINS.iterdir() if not path.is_symlink()]
    files += [str(ROOT / "bench" / "gpu_check.sh")]
    done = subprocess.run([checker, "-x", "--severity=style", *files], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
