# piprov: `make demo` shows the main job, `make test` runs every test.
CARGO ?= cargo
FUZZ_SECONDS ?= 60

.PHONY: all deps build demo station-demo test lint load e2e fuzz bench clean share deb

all: build

deps:
	@sh scripts/install-deps.sh

build:
	$(CARGO) build --release

demo: deps build
	sh scripts/demo.sh

# The bench: loop devices as card readers, cards pushed in while `piprov
# station` runs (needs root); its page at http://127.0.0.1:8080/ meanwhile.
station-demo: deps build
	sh scripts/station-demo.sh

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	# The workstation tool alone, and with each server alone (cargo features).
	$(CARGO) clippy --no-default-features --lib --bins -- -D warnings
	$(CARGO) clippy --no-default-features --features broker --lib --bins -- -D warnings
	$(CARGO) clippy --no-default-features --features station --lib --bins -- -D warnings
	shellcheck -x -s sh tests/fixtures/*.sh bench/*.sh tests/e2e/*.sh tests/standins/* scripts/*.sh $(wildcard firstboot/*.sh)

# Every test, with a private PostgreSQL server up (scripts/with-postgres.sh);
# then the broker's tests again with their records in PostgreSQL. A test binary
# still running after 20 minutes is hung: its threads are shown and it is killed.
test: lint
	sh scripts/with-postgres.sh sh scripts/watchdog.sh 1200 sh -c '$(CARGO) test && \
		PIPROV_TEST_BROKER_DATABASE=postgres $(CARGO) test --test broker --test device_keys --test broker_shared'

# The broker under load: 2,000 enrollments from 100 clients (tests/broker_load.rs)
# on SQLite with one broker, on PostgreSQL with one and with two, unsigned and
# signed with device keys; a broker SIGKILLed and restarted part-way, PostgreSQL
# restarted too. Release build: it measures the broker. Figures go to stderr and
# to target/tmp/broker-load-*.json.
load: deps
	sh scripts/with-postgres.sh sh scripts/watchdog.sh 1200 $(CARGO) test --release --test broker_load -- --ignored --nocapture --test-threads=1

# Cards booted in virtual machines (tests/e2e.rs): a debootstrap image (cached in
# /var/tmp/piprov-e2e, or PIPROV_E2E_CACHE), stamped, flashed, booted with QEMU;
# KVM when it runs guests here, QEMU's emulator otherwise (the test says which).
e2e: deps
	sh scripts/watchdog.sh 3600 $(CARGO) test --test e2e -- --ignored --nocapture

# Bounded fuzzing (needs cargo-fuzz), FUZZ_SECONDS each: the partition-table and
# inspect path, the flash map and the bmap parser, the FAT reader, the ext4
# facts the audit reads, and the card's settings reader (sh, against a model).
FUZZ_TARGETS = inspect_image flash_map fat_boot ext4_facts card_settings
# `-s none`: the address sanitizer needs a nightly compiler; Rust code is memory-safe
# without it and the fuzzer is still coverage-guided, hunting panics and hangs.
fuzz: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	[ -f fuzz/corpus/card_settings/seed.conf ] || sh fuzz/make-seed.sh fuzz/corpus
	for target in $(FUZZ_TARGETS); do \
		dict=; [ -f fuzz/$$target.dict ] && dict=-dict=fuzz/$$target.dict; \
		$(CARGO) fuzz run -s none $$target fuzz/corpus/$$target -- -max_total_time=$(FUZZ_SECONDS) \
			-max_len=655360 -timeout=10 -rss_limit_mb=2048 $$dict || exit 1; \
	done

# Man pages and shell completions, made from the command-line definitions.
share: build
	target/release/piprov man target/share/man
	mkdir -p target/share/completions
	target/release/piprov completions bash > target/share/completions/piprov
	target/release/piprov completions zsh > target/share/completions/_piprov
	target/release/piprov completions fish > target/share/completions/piprov.fish

# A Debian package (cargo-deb): binary, man pages, completions, example recipes.
deb: share
	@command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --locked
	$(CARGO) deb --no-build --output target/debian/

clean:
	$(CARGO) clean
	rm -rf demo

bench:
	sh bench/run.sh
