#!/usr/bin/env bash
# Builds the machine side (buildlet, stage0, bootstrapswarm) for linux/arm64
# on a Debian/x86_64 machine, installing what is missing from Debian's
# packages, and prints where the binaries are. Run them on an arm64 board,
# or here under emulation:
#
#   qemu-aarch64-static target/cross/aarch64-unknown-linux-gnu/release/buildlet -listen=127.0.0.1:5936
#
# (or directly, once qemu is registered with binfmt_misc, which this script
# does when it can).
#
# Emulation note: run them WITHOUT `-L /usr/aarch64-linux-gnu`. The cross
# toolchain's runtime C library there (libc6-arm64-cross 2.36-8cross1)
# hangs in pthread_create under Debian 12's qemu-user (7.2) — a five-line C
# program that starts one thread spins at 100 % CPU — so anything with a
# second thread (the buildlet's async runtime) never starts. The distribution's
# own arm64 C library (libc6:arm64, installed here) works, and qemu finds it
# at /lib/ld-linux-aarch64.so.1 without -L.
#
# It changes the machine: dpkg gains the arm64 architecture, and qemu is
# registered with the kernel's binfmt_misc (both as Debian's own qemu and
# cross packages expect; undo with `dpkg --remove-architecture arm64` after
# removing the :arm64 packages, and `echo -1 >
# /proc/sys/fs/binfmt_misc/qemu-aarch64`).
#
# Uses Debian's Rust (rustc-web, cargo-web: 1.96) and its arm64 standard
# library, so no rustup target download is needed. Extra arguments go to
# cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
SUDO=""
# -n: fail at once rather than wait for a password no one will type (CI).
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "scripts/cross.sh: adding the arm64 architecture to dpkg" >&2
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -q
fi
need=()
for p in gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static rustc-web cargo-web \
         libstd-rust-web-dev:arm64 libc6:arm64; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "scripts/cross.sh: installing ${need[*]}" >&2
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi

# Let the kernel run arm64 programs through qemu (as Debian's
# systemd-binfmt does at boot, which containers often lack), so an arm64
# stage0 can start the arm64 buildlet it downloaded.
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  [ -e /proc/sys/fs/binfmt_misc/register ] ||
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
  if [ -w /proc/sys/fs/binfmt_misc/register ] || [ -n "$SUDO" ]; then
    $SUDO sh -c 'cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register' ||
      echo "scripts/cross.sh: could not register qemu-aarch64 with binfmt_misc; arm64 programs run only as qemu-aarch64-static PROGRAM" >&2
  fi
fi

# Debian's toolchain, which has the arm64 standard library; a rustup
# toolchain earlier on PATH would not.
export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_DIR="${CROSS_TARGET_DIR:-$PWD/target/cross}"
/usr/bin/cargo build --release --target "$TARGET" -p buildlet -p stage0 "$@"

out="$CARGO_TARGET_DIR/$TARGET/release"
for b in buildlet stage0 bootstrapswarm; do
  [ -x "$out/$b" ] || { echo "scripts/cross.sh: $out/$b was not built" >&2; exit 1; }
done
# A smoke check under emulation: it must print its flags.
qemu-aarch64-static "$out/buildlet" --help >/dev/null
echo "$out"
