# airlock: `make run` and `make test` are all a fresh Debian 12 machine needs.
#
#   make run     set up, build, and run airlockd on 127.0.0.1:4000 (QEMU)
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

.PHONY: all setup build image run test lint unit bench clean

all: image

setup:
	@scripts/setup.sh

# Static binaries: the agent (its own size profile), airlockd, and the fake
# vendor CLI, linked under the real CLIs' names in build/fakes. The
# streamer is the one glibc binary: it links the system's GStreamer, and
# sits next to the agent, where the agent looks for it.
build: setup
	cargo build --profile guest --locked --target $(MUSL) -p airlock-guest
	cargo build --release --locked --target $(MUSL) -p airlock-host -p airlock-fakes --bins
	cargo build --release --locked -p airlock-streamer
	@mkdir -p $(BUILD)/bin $(BUILD)/fakes
	install -m 0755 $(CARGO_TARGET_DIR)/$(MUSL)/guest/airlock-guest $(BUILD)/bin/airlock-guest
	install -m 0755 $(CARGO_TARGET_DIR)/release/airlock-streamer $(BUILD)/bin/airlock-streamer
	install -m 0755 $(CARGO_TARGET_DIR)/$(MUSL)/release/airlockd $(BUILD)/bin/airlockd
	install -m 0755 $(CARGO_TARGET_DIR)/$(MUSL)/release/fake-cli $(BUILD)/bin/fake-cli
	@for cli in codex claude gemini airlock-demo-cli; do ln -sfn ../bin/fake-cli $(BUILD)/fakes/$$cli; done

image: build
	image/build-initramfs.sh --agent $(BUILD)/bin/airlock-guest --out $(BUILD)/image

run: image
	$(BUILD)/bin/airlockd --config config/dev.toml

lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

test: image lint
	cargo test --workspace --locked -- --test-threads=$(TEST_THREADS)

bench: image
	@scripts/setup.sh bench
	cargo bench --locked -p airlock-tests --bench spine
	cargo bench --locked -p airlock-tests --bench login
	cargo bench --locked -p airlock-tests --bench live

clean:
	rm -rf $(BUILD)
	cargo clean
