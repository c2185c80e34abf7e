# Sourced by bootstrap.sh (after openssl.sh): the FIPS providers `--fips` loads.
#
# A daemon holds up to three libcryptos, and each must load a FIPS provider it can use:
# - "pinned": the XTS engine's (the pinned OpenSSL 3.5, static) and the `cryptography`
#   wheel's (a later OpenSSL: RSA, AES-GCM seals, HKDF) load the provider openssl.sh builds
#   with the engine's libcrypto (a provider loads in its own or a later release);
# - "system": Debian 12's OpenSSL 3.0 (Python's `ssl`: TLS) finds no TLS cipher in a 3.5
#   provider, so its provider is built from an OpenSSL 3.0 source: bookworm-security's orig
#   tarball, SHA-256 from its signed Sources index (pinned here).
# Each is a tree {lib/ossl-modules/fips.so, ssl/fipsmodule.cnf (the fipsinstall output:
# the integrity MAC of that fips.so), bin/openssl, VERSION}, built once into .cache/. The
# daemons find them through $ROOT/.cache/fips/{pinned,system}, links this points at the
# trees (or --fips-dir / FIPS_DIR naming a directory laid out the same way).
#
# Validated or not: only the releases named in a FIPS certificate (3.0.9 for FIPS 140-2,
# 3.1.2 for FIPS 140-3) give a validated module; the defaults are "a FIPS provider, not a
# validated build" (docs/operations.md). An operator builds another source with
#   NBDSERVER_FIPS_SYSTEM_OPENSSL_VERSION + NBDSERVER_FIPS_SYSTEM_OPENSSL_SHA256
#   (+ NBDSERVER_FIPS_SYSTEM_OPENSSL_TARBALL, a local file; else Debian's pool), and the
#   pinned one with NBDSERVER_FIPS_PINNED_OPENSSL_{VERSION,SHA256,TARBALL}.
# No hash, no build. A failure warns and returns 0: everything but `--fips` works, and
# `--fips` then refuses to start, saying the module is missing.

FIPS_SYSTEM_OPENSSL_VERSION="${NBDSERVER_FIPS_SYSTEM_OPENSSL_VERSION:-3.0.22}"
FIPS_SYSTEM_OPENSSL_SHA256="${NBDSERVER_FIPS_SYSTEM_OPENSSL_SHA256:-}"
if [ -z "${NBDSERVER_FIPS_SYSTEM_OPENSSL_VERSION:-}" ]; then
    FIPS_SYSTEM_OPENSSL_SHA256=67ebca7e50d17383028045486653492195b83db95f8558709701bb47b5c1ef81
fi
FIPS_LINKS="$ROOT/.cache/fips"

bootstrap_fips() {
    local pinned="" system=""
    if [ -n "${NBDSERVER_FIPS_PINNED_OPENSSL_VERSION:-}" ]; then
        pinned="$(_fips_provider "$NBDSERVER_FIPS_PINNED_OPENSSL_VERSION" \
            "${NBDSERVER_FIPS_PINNED_OPENSSL_SHA256:-}" "${NBDSERVER_FIPS_PINNED_OPENSSL_TARBALL:-}")" || true
    elif [ -f "$OPENSSL_PREFIX/ssl/fipsmodule.cnf" ]; then
        pinned="$OPENSSL_PREFIX"
    fi
    system="$(_fips_provider "$FIPS_SYSTEM_OPENSSL_VERSION" "$FIPS_SYSTEM_OPENSSL_SHA256" \
        "${NBDSERVER_FIPS_SYSTEM_OPENSSL_TARBALL:-}")" || true
    mkdir -p "$FIPS_LINKS"
    _fips_link pinned "$pinned"
    _fips_link system "$system"
}

# NAME TREE: $FIPS_LINKS/NAME -> TREE, or no link when there is no tree.
_fips_link() {
    if [ -n "$2" ]; then
        ln -sfn "$2" "$FIPS_LINKS/$1"
    else
        rm -f "$FIPS_LINKS/$1"
    fi
}

# VERSION SHA256 [TARBALL]: prints the provider tree's path, building it once.
_fips_provider() {
    local version="$1" sha256="$2" tarball="${3:-}" prefix
    if [ -z "$sha256" ]; then
        echo "bootstrap: WARNING: no SHA-256 for OpenSSL $version's FIPS provider;" \
             "--fips will refuse to start" >&2
        return 1
    fi
    prefix="$ROOT/.cache/fips-$version-${sha256:0:12}"
    if [ ! -f "$prefix/ssl/fipsmodule.cnf" ]; then
        echo "bootstrap: building OpenSSL $version's FIPS provider (a few minutes)" >&2
        if ! _build_openssl_tree "$version" "$sha256" "$prefix" "$tarball" >&2; then
            echo "bootstrap: WARNING: could not build OpenSSL $version's FIPS provider;" \
                 "--fips will refuse to start" >&2
            return 1
        fi
    fi
    echo "$prefix"
}
