# frozen_string_literal: true

# Writes a Makefile that builds the extension with cargo directly (the
# rb_sys gem is not needed). The cargo target directory lives in a
# temporary directory that `make install` removes, so no build output stays
# inside an installed gem.
require "rbconfig"
require "tmpdir"

root = File.expand_path("../..", __dir__)
manifest = File.join(root, "Cargo.toml")
abort "exporter: #{manifest} missing" unless File.exist?(manifest)
abort "exporter: cargo not found in PATH (install Rust: https://rustup.rs)" unless system("cargo --version > /dev/null 2>&1")

# EXPORTER_CARGO_TARGET_DIR reuses an existing cargo target directory (it
# is then left in place); by default a temporary one is used and removed.
own_target = ENV["EXPORTER_CARGO_TARGET_DIR"].to_s.empty?
target = own_target ? File.join(Dir.tmpdir, "exporter-cargo-target-#{Process.pid}") : ENV["EXPORTER_CARGO_TARGET_DIR"]
dlext = RbConfig::CONFIG["DLEXT"]
ruby = RbConfig.ruby

File.write("Makefile", <<~MAKE)
  RUBY = #{ruby}
  TARGET_DIR = #{target}
  DLEXT = #{dlext}
  sitearchdir ?= #{RbConfig::CONFIG['sitearchdir']}

  all: exporter.$(DLEXT) exporter-sidecar

  # The extension and the sidecar helper binary, in one cargo build.
  exporter.$(DLEXT) exporter-sidecar:
  \tRUBY=$(RUBY) cargo build --release --locked --manifest-path #{manifest} -p exporter -p exporter_sidecar --target-dir $(TARGET_DIR)
  \tcp $(TARGET_DIR)/release/libexporter.so exporter.$(DLEXT)
  \tcp $(TARGET_DIR)/release/exporter-sidecar exporter-sidecar

  # The helper goes beside the extension: lib/exporter/sidecar.rb finds it there.
  install: all
  \tmkdir -p $(DESTDIR)$(sitearchdir)/exporter
  \tcp exporter.$(DLEXT) $(DESTDIR)$(sitearchdir)/exporter/exporter.$(DLEXT)
  \tcp exporter-sidecar $(DESTDIR)$(sitearchdir)/exporter/exporter-sidecar
  \tchmod 755 $(DESTDIR)$(sitearchdir)/exporter/exporter-sidecar
  \trm -f exporter.$(DLEXT) exporter-sidecar
  #{own_target ? "\trm -rf $(TARGET_DIR)" : ""}

  clean:
  \trm -f exporter.$(DLEXT) exporter-sidecar
  #{own_target ? "\trm -rf $(TARGET_DIR)" : ""}

  .PHONY: all install clean
MAKE
