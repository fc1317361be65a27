"""Lint of containers/medhpc.def and containers/Dockerfile without a container engine.

Structure only: the sections a definition needs, the files it copies exist, nothing is
installed where a read-only image run by another user would need it (/root, /home, user
site), every cache is settable, and both files build the same thing. Building the image is
not tested here.
"""

import re
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFINITION = ROOT / "containers" / "medhpc.def"
DOCKERFILE = ROOT / "containers" / "Dockerfile"
CACHE_VARIABLES = ("NUMBA_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME")
REQUIRED_ENV = CACHE_VARIABLES + ("PYTHONNOUSERSITE", "HDF5_USE_FILE_LOCKING")


def definition_sections(text: str) -> tuple[dict, dict]:
    """Header keywords and ``%section`` bodies of an Apptainer definition."""
    header, sections, current = {}, {}, None
    for line in text.splitlines():
        if line.lstrip().startswith("#") and current is None:
            continue
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            current = match.group(1)
            sections[current] = []
        elif current is None and ":" in line:
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
        elif current is not None:
            sections[current].append(line)
    return header, {name: "\n".join(body) for name, body in sections.items()}


@pytest.fixture(scope="module")
def definition():
    return definition_sections(DEFINITION.read_text())


def code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def test_definition_header_and_sections(definition):
    header, sections = definition
    assert header["Bootstrap"] == "docker"
    assert header["From"]
    for name in ("arguments", "files", "post", "environment", "runscript", "test", "help"):
        assert name in sections, f"%{name} missing"


def test_definition_files_exist(definition):
    _, sections = definition
    for line in code_lines(sections["files"]):
        source, destination = line.split()
        assert (ROOT / source).exists(), f"%files: {source} is not in the repository"
        assert destination.startswith("/opt/medhpc/")


def test_dockerfile_copies_exist():
    text = DOCKERFILE.read_text()
    for line in code_lines(text):
        if line.startswith(("COPY", "ADD")):
            *sources, destination = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"{line}: {source} is not in the repository"
            assert destination.startswith("/opt/medhpc/")


@pytest.mark.parametrize("path", [DEFINITION, DOCKERFILE], ids=lambda p: p.name)
def test_nothing_in_home_or_root(path):
    for line in code_lines(path.read_text()):
        assert not re.search(r"(^|[\s=:\"'])(/root|/home|~)(/|\s|$)", line), line
        assert "--user" not in line or "docker run" in line, line
        assert "pip install" not in line or "/opt/medhpc/venv/bin/pip" in line, line


@pytest.mark.parametrize("path", [DEFINITION, DOCKERFILE], ids=lambda p: p.name)
def test_environment_makes_a_read_only_image_usable(path):
    text = path.read_text()
    if path == DEFINITION:
        text = definition_sections(text)[1]["environment"]
    for name in REQUIRED_ENV:
        assert re.search(rf"\b{name}=", text), f"{name} is not set"
    assert re.search(r"PYTHONNOUSERSITE=1", text)
    assert re.search(r"HDF5_USE_FILE_LOCKING=FALSE", text)
    for name in CACHE_VARIABLES:
        assert re.search(rf"{name}=\"?(\$\{{{name}:-)?/tmp/", text), f"{name} not under /tmp"
    assert "/opt/medhpc/venv/bin" in text


def test_definition_and_dockerfile_agree(definition):
    _, sections = definition
    arguments = dict(line.strip().split("=", 1) for line in code_lines(sections["arguments"]))
    dockerfile = DOCKERFILE.read_text()
    for name, value in arguments.items():
        assert f"ARG {name}={value}" in dockerfile
        assert f"{{{{ {name} }}}}" in sections["post"], f"%arguments {name} is not used"
    base = definition[0]["From"]
    assert f"FROM {base}" in dockerfile


def test_extras_exist_and_no_mpi_wheel(definition):
    """The extras the image installs are medhpc's; the MPI wheel would shadow the image's MPI."""
    _, sections = definition
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["project"]["optional-dependencies"])
    arguments = dict(line.strip().split("=", 1) for line in code_lines(sections["arguments"]))
    chosen = set(arguments["EXTRAS"].split(","))
    assert chosen <= extras
    assert "mpich" not in chosen
    for text in (sections["post"], DOCKERFILE.read_text()):
        assert "[mpich" not in text and "pip install mpich" not in text


def test_job_scripts_use_exec_and_nv():
    """Container job scripts hand GPUs in with --nv; their launcher calls `exec` (never `run`)."""
    assert '"$MEDHPC_CONTAINER_RUNTIME" exec' in (ROOT / "bin" / "medhpc-job").read_text()
    scripts = sorted((ROOT / "jobscripts").glob("*-apptainer.sh")) + sorted(
        (ROOT / "jobscripts").glob("*-singularity.sh"))
    assert len(scripts) >= 3
    for script in scripts:
        text = script.read_text()
        assert "gpu_flag=--nv" in text
        assert "MEDHPC_CONTAINER=" in text
