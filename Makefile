# vitamin developer targets. Everything installs from PyPI into .venv; nothing comes from apt.
#
#   make test               fast tests (everything not marked slow)
#   make demo               end-to-end demo (once the compiler provides it)
#   make rtl CONFIG=tiny    Verilog of the accelerator for a preset (default ecp5)
#   make bench              slow tests, then the benchmark report
#   make lint [LINT_PATHS="a.py b.py"]

PYTHON ?= python3
CONFIG ?= ecp5
LINT_PATHS ?= .

VENV := .venv
VPY := $(VENV)/bin/python
# Stamp file: pip runs again only when pyproject.toml is newer than the last install.
STAMP := $(VENV)/.installed

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install test demo rtl bitstream bench lint clean distclean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e ".[test]"
	touch $@

# pytest exits 5 when it collects no tests; that is reported and fails the target like any error.
test: $(STAMP)
	@$(VPY) -m pytest -m "not slow" -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test: pytest collected no tests" >&2; fi; exit $$rc

# `vitamin demo` is not written yet; until then run vitamin/demo.py when it exists.
demo: $(STAMP)
	@if [ -f vitamin/demo.py ]; then \
		$(VPY) -m vitamin.demo; \
	else \
		echo "demo: not available yet (compiler issue)" >&2; exit 1; \
	fi

rtl: $(STAMP)
	mkdir -p build
	$(VENV)/bin/vitamin rtl --config $(CONFIG) -o build/accel_$(CONFIG).v

# Placeholder until the board flows exist: the bitstream builds are the slow tests named *bitstream*.
bitstream: $(STAMP)
	$(VPY) -m pytest -m slow -k bitstream $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m pytest -m slow $(PYTEST_ARGS)
	@if $(VPY) -c "import importlib.util, sys; \
		sys.exit(importlib.util.find_spec('vitamin.bench') is None)"; then \
		$(VPY) -m vitamin.bench; \
	else \
		echo "bench: vitamin.bench not available yet; ran the slow tests only"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)

clean:
	rm -rf build sim_build .pytest_cache .ruff_cache results.xml
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
