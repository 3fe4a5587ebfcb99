#!/usr/bin/env bash
# Provision one lab host: toolchain, build blkmirror, make an identity.
set -euo pipefail
name="$1"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq build-essential curl qemu-utils libnbd-bin fio fuse3 nbd-client e2fsprogs
if ! command -v cargo >/dev/null; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi
source "$HOME/.cargo/env"
cd /blkmirror
cargo build --release
install -m 0755 target/release/blkmirror /usr/local/bin/blkmirror
if [ ! -f /etc/blkmirror/id/cert.pem ]; then
    blkmirror init /etc/blkmirror/id
fi
echo "$name: $(blkmirror fingerprint /etc/blkmirror/id)" | tee /vagrant-fingerprint.txt
