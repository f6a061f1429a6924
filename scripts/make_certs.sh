#!/usr/bin/env bash
# Make TLS certificates and SuperNode authentication keys for a Flower 1.41
# Deployment Engine federation.
#
# Usage: scripts/make_certs.sh DIR [N_NODES] [EXTRA_SAN ...]
#
#   DIR        output directory (created if missing)
#   N_NODES    number of SuperNode key pairs to create (default: 2)
#   EXTRA_SAN  extra subjectAltName entries for the SuperLink server
#              certificate, e.g. DNS:superlink.example.org IP:10.0.0.5
#              (localhost and 127.0.0.1 are always included).
#              Also settable via SUPERLINK_SANS="DNS:a IP:1.2.3.4".
#
# Output (idempotent: existing files are kept, missing ones are created):
#   DIR/ca.key, DIR/ca.crt              self-signed CA (EC P-384, 10 years)
#   DIR/server.key, DIR/server.crt      SuperLink cert signed by the CA (SAN)
#   DIR/supernode-<i>/node.key          SuperNode private key (OpenSSH, ECDSA P-384)
#   DIR/supernode-<i>/node.key.pub      SuperNode public key (OpenSSH, register it
#                                       with `flwr supernode register`)
#   DIR/supernode_public_keys.txt       all public keys, one per line (for reference)
#
# Flower 1.41 expects: SuperLink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile
# (PEM); SuperNode --root-certificates ca.crt and
# --auth-supernode-private-key node.key (OpenSSH-format EC private key on a NIST
# curve); `flwr supernode register node.key.pub <connection>` (OpenSSH EC public
# key). The legacy CSV of public keys (--auth-list-public-keys) is rejected by
# Flower 1.41, so no CSV is produced.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 DIR [N_NODES] [EXTRA_SAN ...]" >&2
    exit 2
fi

DIR=$1
N_NODES=${2:-2}
shift $(( $# >= 2 ? 2 : 1 ))
EXTRA_SANS=("$@")
if [[ -n "${SUPERLINK_SANS:-}" ]]; then
    # shellcheck disable=SC2206
    EXTRA_SANS+=(${SUPERLINK_SANS})
fi

if ! [[ "$N_NODES" =~ ^[0-9]+$ ]]; then
    echo "N_NODES must be a non-negative integer, got '$N_NODES'" >&2
    exit 2
fi

command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "ssh-keygen not found" >&2; exit 1; }

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
umask 077

# ---------------------------------------------------------------- CA
if [[ ! -s "$DIR/ca.key" || ! -s "$DIR/ca.crt" ]]; then
    rm -f "$DIR/ca.key" "$DIR/ca.crt" "$DIR/server.crt" "$DIR/server.key"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$DIR/ca.key"
    openssl req -x509 -new -nodes -key "$DIR/ca.key" -sha256 -days 3650 \
        -subj "/CN=fedmeta-ca" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$DIR/ca.crt"
    echo "created CA: $DIR/ca.crt"
fi

# ---------------------------------------------------------------- SuperLink cert
SAN="DNS:localhost,IP:127.0.0.1,IP:::1"
for s in "${EXTRA_SANS[@]+"${EXTRA_SANS[@]}"}"; do
    SAN="$SAN,$s"
done
# Re-issue the server cert if it is missing or the SAN list changed.
if [[ -s "$DIR/server.crt" && -s "$DIR/server.key" && -s "$DIR/server.san" ]] \
    && [[ "$(cat "$DIR/server.san")" == "$SAN" ]]; then
    :
else
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$DIR/server.key"
    cat >"$DIR/server.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$SAN
EOF
    openssl req -new -key "$DIR/server.key" -subj "/CN=localhost" \
        -out "$DIR/server.csr"
    openssl x509 -req -in "$DIR/server.csr" -CA "$DIR/ca.crt" \
        -CAkey "$DIR/ca.key" -CAcreateserial -out "$DIR/server.crt" \
        -days 825 -sha256 -extfile "$DIR/server.ext" 2>/dev/null
    rm -f "$DIR/server.csr" "$DIR/server.ext"
    printf '%s' "$SAN" >"$DIR/server.san"
    echo "created SuperLink cert: $DIR/server.crt (SAN: $SAN)"
fi

# ---------------------------------------------------------------- SuperNode keys
: >"$DIR/supernode_public_keys.txt.tmp"
for (( i = 0; i < N_NODES; i++ )); do
    NDIR="$DIR/supernode-$i"
    mkdir -p "$NDIR"
    if [[ ! -s "$NDIR/node.key" || ! -s "$NDIR/node.key.pub" ]]; then
        rm -f "$NDIR/node.key" "$NDIR/node.key.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedmeta-supernode-$i" \
            -f "$NDIR/node.key"
        echo "created SuperNode key pair: $NDIR/node.key(.pub)"
    fi
    cat "$NDIR/node.key.pub" >>"$DIR/supernode_public_keys.txt.tmp"
done
mv "$DIR/supernode_public_keys.txt.tmp" "$DIR/supernode_public_keys.txt"

# Public material is world-readable; private keys stay 0600.
chmod 644 "$DIR/ca.crt" "$DIR/server.crt" "$DIR/supernode_public_keys.txt"
for (( i = 0; i < N_NODES; i++ )); do
    chmod 644 "$DIR/supernode-$i/node.key.pub"
    chmod 600 "$DIR/supernode-$i/node.key"
done
chmod 600 "$DIR/ca.key" "$DIR/server.key"

openssl verify -CAfile "$DIR/ca.crt" "$DIR/server.crt" >/dev/null
echo "certificates and keys ready in $DIR"
