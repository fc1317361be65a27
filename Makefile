# medhpc: two commands for a newcomer with only Python: `make demo` and `make test`.
# Both create .venv and install what they need (the MPI wheel included); both are idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
MPIEXEC ?= $(BIN)/mpiexec
RANKS ?= 2
DEMO ?= demo-output
# Hydra ends a hung MPI job after this many seconds.
export MPIEXEC_TIMEOUT ?= 900
export OMPI_ALLOW_RUN_AS_ROOT ?= 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM ?= 1
export PRTE_MCA_rmaps_default_mapping_policy ?= :oversubscribe
PYTEST := -m pytest -q -p no:cacheprovider

.PHONY: demo test test-serial test-cudasim test-mpi install install-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[mpich,plot]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e ".[mpich,test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/medhpc info
	$(BIN)/medhpc compile --app pet
	$(BIN)/medhpc phantom pet --out $(DEMO)/phantom --overwrite
	$(BIN)/medhpc pet-simulate --activity $(DEMO)/phantom/activity.nii.gz \
	    --mu-map $(DEMO)/phantom/mu_map.nii.gz --scanner small-test --counts 2e7 \
	    --out $(DEMO)/sinogram.h5 --overwrite
	$(MPIEXEC) -n $(RANKS) $(BIN)/medhpc pet-recon --sinogram $(DEMO)/sinogram.h5 \
	    --out $(DEMO)/recon.nii.gz --iterations 3 --subsets 8 --png \
	    --timings $(DEMO)/timings.json --overwrite
	$(BIN)/medhpc report $(DEMO)/timings.json --png $(DEMO)/timings.png --overwrite
	@echo "demo outputs in $(DEMO)/: recon.nii.gz, recon.png, timings.png"

test: test-serial test-cudasim test-mpi

test-serial: install-test
	$(PY) $(PYTEST) tests

test-cudasim: install-test
	NUMBA_ENABLE_CUDASIM=1 $(PY) $(PYTEST) -m cudasim tests

test-mpi: install-test
	$(MPIEXEC) -n 2 $(PY) $(PYTEST) --with-mpi -m mpi tests
	$(MPIEXEC) -n 3 $(PY) $(PYTEST) --with-mpi -m mpi tests
	$(MPIEXEC) -n 4 $(PY) $(PYTEST) --with-mpi -m mpi tests

# Every application's benchmark beside its peers; results in bench/results/ (see docs/performance.md).
bench: install-test
	$(PY) bench/pet/run.py
	$(PY) bench/lddmm/run.py
	$(PY) bench/tnr/run.py
	$(PY) bench/ct/run.py

clean:
	rm -rf $(DEMO) build *.egg-info
