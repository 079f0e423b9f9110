#!/usr/bin/env bash
# Makes a test CA and, signed by it, a server certificate (for localhost,
# 127.0.0.1 and ::1 unless NAMES says otherwise) and a client certificate,
# in the layout nbd-runner, nbd-cli, nbdkit, qemu and libnbd all read:
#   DIR/ca-cert.pem DIR/server-cert.pem DIR/server-key.pem
#   DIR/client-cert.pem DIR/client-key.pem     (keys 0600)
# The CA's key stays in DIR/ca/, which the runner never reads.
# Usage: make-certs.sh DIR [SAN-LIST]  e.g. "DNS:nbd1.example,IP:10.0.0.5"
set -euo pipefail
dir=$1
names=${2:-DNS:localhost,IP:127.0.0.1,IP:::1}
days=${DAYS:-30}
mkdir -p "$dir/ca"
chmod 700 "$dir/ca"
umask 077
cd "$dir"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca/ca-key.pem
openssl req -x509 -new -key ca/ca-key.pem -out ca-cert.pem -days "$days" -subj "/CN=nbd-runner test CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
sign() { # NAME SUBJECT EXTENSIONS
  key "$1-key.pem"
  printf '%s\n' "$3" >"ca/$1.ext"
  openssl req -new -key "$1-key.pem" -subj "$2" -out "ca/$1.csr"
  openssl x509 -req -in "ca/$1.csr" -CA ca-cert.pem -CAkey ca/ca-key.pem -CAserial ca/serial -CAcreateserial \
    -days "$days" -out "$1-cert.pem" -extfile "ca/$1.ext" 2>/dev/null
}
sign server "/CN=nbd-runner" "subjectAltName=$names
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth"
sign client "/CN=nbd-client" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
chmod 644 ca-cert.pem server-cert.pem client-cert.pem
