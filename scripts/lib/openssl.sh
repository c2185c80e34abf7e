# Sourced by bootstrap.sh: builds the libcrypto the XTS engine links statically.
#
# Why: Debian 12 ships OpenSSL 3.0, whose AES-XTS runs at about 6 GB/s here. OpenSSL 3.2
# and later add an AVX-512/VAES XTS path that runs at about 12 GB/s on the same CPU
# (nbdserver/crypto/_xts.c, docs/format.md). Only the engine uses it; TLS and everything
# else keep the system's OpenSSL.
#
# Source: the upstream tarball as Debian 13 (trixie) ships it, fetched from the Debian
# archives apt is configured with (_apt_archives) and checked against the SHA-256 in
# trixie's signed Sources index (pinned here).
# Output: $OPENSSL_PREFIX/{include/openssl,lib/libcrypto.a}, built once (about a minute on
# two cores) and reused. If the source cannot be fetched or built, this warns and returns
# 0: setup.py then links the system libcrypto and the engine is simply slower.
#
# Security updates: a new OpenSSL release means a new version and hash here (then every
# checkout rebuilds). `python -c 'import nbdserver.crypto._xts as x; print(x.OPENSSL_VERSION)'`
# says which one an installed engine runs.

OPENSSL_VERSION=3.5.7
OPENSSL_SHA256=a8c0d28a529ca480f9f36cf5792e2cd21984552a3c8e4aa11a24aa31aeac98e8
OPENSSL_POOL_PATHS=(
    "pool/main/o/openssl/openssl_${OPENSSL_VERSION}.orig.tar.gz"
    "pool/updates/main/o/openssl/openssl_${OPENSSL_VERSION}.orig.tar.gz"
)

# The Debian archives this machine's apt is configured with (deb822 *.sources and
# one-line *.list entries), so no archive address is written here; the pinned SHA-256,
# not the archive, is what the source is trusted for.
_apt_archives() {
    {
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n'
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" || $1 == "deb-src" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }'
    } | grep -E '^(https?|file):' | sed 's:/*$::' | awk '!seen[$0]++'
}
OPENSSL_PREFIX="$ROOT/.cache/openssl-$OPENSSL_VERSION"

bootstrap_openssl() {
    if [ -n "${NBDSERVER_SYSTEM_OPENSSL:-}" ]; then
        unset NBDSERVER_OPENSSL_PREFIX
        return 0
    fi
    if [ ! -f "$OPENSSL_PREFIX/lib/libcrypto.a" ]; then
        echo "bootstrap: building OpenSSL $OPENSSL_VERSION's libcrypto for the XTS engine (about a minute)" >&2
        if ! _build_openssl >&2; then
            echo "bootstrap: WARNING: could not build OpenSSL $OPENSSL_VERSION;" \
                 "the XTS engine links the system's libcrypto (slower)" >&2
            unset NBDSERVER_OPENSSL_PREFIX
            return 0
        fi
    fi
    export NBDSERVER_OPENSSL_PREFIX="$OPENSSL_PREFIX"
}

_build_openssl() (
    set -euo pipefail
    local work tarball url
    mkdir -p "$ROOT/.cache"
    work="$(mktemp -d "$ROOT/.cache/openssl-build.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    tarball="$work/openssl.tar.gz"
    local archive path
    for archive in $(_apt_archives); do
        for path in "${OPENSSL_POOL_PATHS[@]}"; do
            url="$archive/$path"
            if curl -fsSL --retry 2 -m 300 -o "$tarball" "$url" &&
               echo "$OPENSSL_SHA256  $tarball" | sha256sum -c --quiet -; then
                break 2
            fi
            rm -f "$tarball"
        done
    done
    [ -f "$tarball" ] || { echo "bootstrap: no verified OpenSSL $OPENSSL_VERSION source" >&2; return 1; }
    tar -xzf "$tarball" -C "$work"
    cd "$work/openssl-$OPENSSL_VERSION"
    # Only libcrypto, static, position-independent (it goes into a shared extension);
    # no config file, no atexit handler, no loadable modules, no protocols or programs.
    ./Configure no-shared no-module no-dso no-engine no-apps no-tests no-docs \
        no-ui-console no-quic no-ssl no-tls no-dtls no-autoload-config no-atexit \
        -fPIC --prefix="$OPENSSL_PREFIX" --openssldir=/nonexistent >"$work/configure.log" 2>&1 ||
        { tail -n 30 "$work/configure.log"; return 1; }
    { make -j"$(nproc)" build_generated && make -j"$(nproc)" libcrypto.a; } >"$work/make.log" 2>&1 ||
        { tail -n 30 "$work/make.log"; return 1; }
    local stage="$work/stage"
    mkdir -p "$stage/lib" "$stage/include"
    cp libcrypto.a "$stage/lib/"
    cp -r include/openssl "$stage/include/"
    rm -rf "$OPENSSL_PREFIX"
    mv "$stage" "$OPENSSL_PREFIX"
)
