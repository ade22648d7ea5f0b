# Every target installs what it needs first and is safe to run twice.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
KDCACHE := $(VENV)/bin/kdcache
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo paper views targets crops cifar10-folder smoke lint bench bench-loader bench-dump bench-train bench-study bench-gpu bench-host clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[test,plot,timm,lightning,tensorboard]"
	@touch $@

test: install
	$(PY) -m pytest -q tests

# The inner loop: every test but those marked slow (processes spawned, long training); under 2 minutes.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(KDCACHE) demo --out runs/demo $(DEMO_ARGS)

# A study: every unfinished stage of protocols/<name>.toml (rerun to resume), then its report (tables,
# CSVs, plots, verdicts) and the protocol itself in results/<name>/, which is committed.
study-%: install
	@if [ ! -d runs/$* ] && [ -f results/$*/in-progress.tar.gz ]; then \
		echo "resuming from results/$*/in-progress.tar.gz"; mkdir -p runs && tar xzf results/$*/in-progress.tar.gz -C runs; fi
	$(KDCACHE) sweep protocols/$*.toml --out runs/$*
	$(KDCACHE) report runs/$* --out results/$*
	cp protocols/$*.toml results/$*/protocol.toml
	rm -f results/$*/in-progress.tar.gz

# A study longer than one sitting, on machines that do not keep runs/: `make pack-NAME` packs runs/NAME
# (every stage but the data, which the sweep rebuilds identically from its source and checks by
# fingerprint, and the students' weights, which no later stage reads) into results/NAME/in-progress.tar.gz,
# to commit; `make study-NAME` on a clone without runs/NAME unpacks it and resumes.
pack-%:
	mkdir -p results/$*
	tar czhf results/$*/in-progress.tar.gz -C runs --exclude='$*/data-*' --exclude='*.lock' \
		--exclude='$*/students/*/model.pt' $*
	@echo "results/$*/in-progress.tar.gz: $$(du -h results/$*/in-progress.tar.gz | cut -f1)," \
		"$$(ls runs/$*/students/*/summary.json 2>/dev/null | wc -l) students finished"

# The CIFAR-10 studies (what each measures and how long it runs: docs/studies.md): the paper's claims;
# stored views against the clean view and the online teacher; sparse targets against full logits.
paper: study-paper-cpu
views: study-views-cpu
targets: study-targets-cpu
crops: study-crops-cpu

# CIFAR-10 from ../shared written as an image folder (train/ and val/, a folder per class, lossless PNG, in
# index order), once: the ImageNet-style input of protocols/crops-cpu.toml, whose [data] converts it with
# `kdcache data imagefolder --max-side 32` (students see 28 px random-resized crops).
CIFAR10_SRC := ../shared/datasets/cifar10
CIFAR10_FOLDER := runs/cifar10-folder

cifar10-folder: $(CIFAR10_FOLDER)/.done

$(CIFAR10_FOLDER)/.done: | $(STAMP)
	rm -rf $(CIFAR10_FOLDER) $(CIFAR10_FOLDER).tmp
	$(PY) -c 'import sys; from pathlib import Path; from PIL import Image; from kdcache.sources import load_source; \
	s = load_source("cifar10", sys.argv[1]); out = Path(sys.argv[2]); \
	[(p.parent.mkdir(parents=True, exist_ok=True), Image.fromarray(x).save(p)) \
	 for split, d in (("train", s.train), ("val", s.test)) for i, (x, y) in enumerate(zip(d.images, d.labels)) \
	 for p in [out / split / s.classes[y] / f"{i:05d}.png"]]' $(CIFAR10_SRC) $(CIFAR10_FOLDER).tmp
	mv $(CIFAR10_FOLDER).tmp $(CIFAR10_FOLDER)
	touch $@

study-crops-cpu: cifar10-folder

# The whole study chain on tiny synthetic data (protocols/smoke.toml).
smoke: install
	$(KDCACHE) sweep protocols/smoke.toml --out runs/smoke --workers 1
	$(KDCACHE) report runs/smoke

bench-loader: install
	$(PY) benchmarks/bench_loader.py $(BENCH_ARGS)

# Every GPU measurement in one command (a few minutes on one GPU); writes benchmarks/results/gpu.json.
bench-gpu: install
	$(PY) benchmarks/bench_gpu.py $(BENCH_ARGS)

bench-study: install
	$(PY) benchmarks/bench_study.py $(BENCH_ARGS)

bench-dump: install
	$(PY) benchmarks/bench_dump.py $(BENCH_ARGS)

bench-train: install
	$(PY) benchmarks/bench_train.py $(BENCH_ARGS)

# Host work per training step on CPU (about a minute): writes benchmarks/results/host.json.
bench-host: install
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_host.py $(BENCH_ARGS)

# Each benchmark prints its own table and writes benchmarks/results/<name>.json.
bench: bench-loader bench-dump bench-train bench-study bench-host
	@$(PY) benchmarks/summary.py

lint: install
	@$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q ruff
	$(PY) -m ruff check kdcache cli tests benchmarks

clean:
	rm -rf runs benchmarks/results
