# airlock: `make run` and `make test` are all a fresh Debian 12 machine needs.
#
#   make run     set up, build, and run airlockd (QEMU; operator API on build/run/api.sock and 127.0.0.1:4000, viewers on :4001)
#   make test    set up, build, lint, and run every test (what CI runs)
#   make bench   set up, build, and print the benchmark figures
#
# CARGO_TARGET_DIR may point outside the checkout (CI keeps it in a cache).

SHELL := /bin/bash
MUSL := x86_64-unknown-linux-musl
export CARGO_TARGET_DIR ?= $(CURDIR)/target
BUILD := $(CURDIR)/build
# Tests boot real VMs under TCG: two at a time suits a 2-core machine.
TEST_THREADS ?= 2

.PHONY: all setup build-vm build image run test lint unit bench vendor-check clean

all: image

setup:
	@scripts/setup.sh

# What runs inside VMs, in build/bin: the static agent (its own size
# profile), the streamer (the one glibc binary that links the system's
# GStreamer; it sits next to the agent, where the agent looks for it), and
# the fake CLI, linked in build/fakes as the demo provider's airlock-demo-cli
# (no vendor's name: real vendor CLIs run only in VMs; links older builds
# made under their names are removed).
build-vm: setup
	cargo build --profile guest --locked --target $(MUSL) -p airlock-guest
	cargo build --release --locked -p airlock-streamer -p airlock-fakes --bins
	@mkdir -p $(BUILD)/bin $(BUILD)/fakes
	install -m 0755 $(CARGO_TARGET_DIR)/$(MUSL)/guest/airlock-guest $(BUILD)/bin/airlock-guest
	install -m 0755 $(CARGO_TARGET_DIR)/release/airlock-streamer $(BUILD)/bin/airlock-streamer
	install -m 0755 $(CARGO_TARGET_DIR)/release/fake-cli $(BUILD)/bin/fake-cli
	@rm -f $(BUILD)/fakes/codex $(BUILD)/fakes/claude $(BUILD)/fakes/gemini
	@ln -sfn ../bin/fake-cli $(BUILD)/fakes/airlock-demo-cli

# Everything, with airlockd as a static release binary (make run, bench),
# with the demo OAuth server (a production build leaves `--features demo`
# out: cargo build --release --target $(MUSL) -p airlock-host).
build: build-vm
	cargo build --release --locked --target $(MUSL) -p airlock-host --bins --features demo
	install -m 0755 $(CARGO_TARGET_DIR)/$(MUSL)/release/airlockd $(BUILD)/bin/airlockd

# The test initramfs (build/image), and the golden images (build/images/
# browser and cli: symlinks into AIRLOCK_CACHE, which keeps the .deb files,
# the Debian layers and the images by the hash of their inputs, so only
# what changed is rebuilt; the Debian layers take minutes the first time).
export AIRLOCK_CACHE ?= $(HOME)/.cache/airlock
IMAGE_AGENT := --agent $(BUILD)/bin/airlock-guest --cache $(AIRLOCK_CACHE)

image: build-vm
	image/build-initramfs.sh --agent $(BUILD)/bin/airlock-guest --out $(BUILD)/image
	@image/build-image.sh --kind browser $(IMAGE_AGENT) --out $(BUILD)/images/browser \
		--streamer $(BUILD)/bin/airlock-streamer --fake-cli $(BUILD)/bin/fake-cli
	@image/build-image.sh --kind cli $(IMAGE_AGENT) --out $(BUILD)/images/cli \
		--unit systemd/airlock-guest.service

# airlockd with config/dev.toml, and the coturn its live view needs.
run: build image
	scripts/run-dev.sh

# The workspace builds airlockd with the demo (the tests turn it on); the
# second clippy checks the production build without it.
lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cargo clippy -p airlock-host --bins --locked -- -D warnings

# The tests run the debug airlockd, which shares its compiled dependencies
# with the test build (a release build of it would compile them again).
test: image lint
	cargo build --workspace --locked --bins
	AIRLOCK_DAEMON=$(CARGO_TARGET_DIR)/debug/airlockd \
		cargo test --workspace --locked -- --test-threads=$(TEST_THREADS)

# The newest published vendor CLIs (not the pinned ones) against the login
# contract the pinned ones pass in CI; prints per CLI: version, passed or
# where it broke. Not part of CI (the registry moves under it).
vendor-check: build-vm
	@scripts/vendor-check.sh

bench: build image
	@scripts/setup.sh bench
	cargo bench --locked -p airlock-tests --bench spine
	cargo bench --locked -p airlock-tests --bench login
	cargo bench --locked -p airlock-tests --bench live
	cargo bench --locked -p airlock-tests --bench browser_vm
	cargo bench --locked -p airlock-tests --bench snapshots

clean:
	rm -rf $(BUILD)
	cargo clean
