# Sourced by bootstrap.sh: builds the libcrypto the XTS engine links statically, and the
# FIPS provider of the same release that `--fips` loads into it (scripts/lib/fips.sh).
#
# Why: Debian 12 ships OpenSSL 3.0, whose AES-XTS runs at about 6 GB/s here. OpenSSL 3.2
# and later add an AVX-512/VAES XTS path that runs at about 12 GB/s on the same CPU
# (nbdserver/crypto/_xts.c, docs/format.md). Only the engine uses it; TLS and everything
# else keep the system's OpenSSL.
#
# Source: the upstream tarball as Debian 13 (trixie) ships it, fetched from the Debian
# archives apt is configured with (_apt_archives) and checked against the SHA-256 in
# trixie's signed Sources index (pinned here).
# Output: $OPENSSL_PREFIX/{include/openssl,lib/libcrypto.a} and the FIPS provider beside
# them ({lib/ossl-modules/fips.so,ssl/fipsmodule.cnf,bin/openssl}), built once (a few
# minutes on two cores) and reused. If the source cannot be fetched or built, this warns
# and returns 0: setup.py then links the system libcrypto and the engine is simply slower.
#
# Security updates: a new OpenSSL release means a new version and hash here (then every
# checkout rebuilds). `python -c 'import nbdserver.crypto._xts as x; print(x.OPENSSL_VERSION)'`
# says which one an installed engine runs.

OPENSSL_VERSION=3.5.7
OPENSSL_SHA256=a8c0d28a529ca480f9f36cf5792e2cd21984552a3c8e4aa11a24aa31aeac98e8

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
# "-fips": since the build can load a provider module and makes the FIPS provider; the
# name changed with that, so a checkout rebuilds the engine against it.
OPENSSL_PREFIX="$ROOT/.cache/openssl-$OPENSSL_VERSION-fips"

# Fetches OpenSSL VERSION's upstream tarball from Debian's pool into OUT and checks it
# against SHA256; returns 1 when no archive has it. Also used for the FIPS provider.
_fetch_openssl_source() {
    local version="$1" sha256="$2" out="$3" archive path url
    for archive in $(_apt_archives); do
        for path in "pool/main/o/openssl/openssl_${version}.orig.tar.gz" \
                    "pool/updates/main/o/openssl/openssl_${version}.orig.tar.gz"; do
            url="$archive/$path"
            if curl -fsSL --retry 2 -m 300 -o "$out" "$url" &&
               echo "$sha256  $out" | sha256sum -c --quiet -; then
                return 0
            fi
            rm -f "$out"
        done
    done
    echo "bootstrap: no verified OpenSSL $version source" >&2
    return 1
}

bootstrap_openssl() {
    if [ -n "${NBDSERVER_SYSTEM_OPENSSL:-}" ]; then
        unset NBDSERVER_OPENSSL_PREFIX
        return 0
    fi
    if [ ! -f "$OPENSSL_PREFIX/lib/libcrypto.a" ]; then
        echo "bootstrap: building OpenSSL $OPENSSL_VERSION's libcrypto and FIPS provider for the XTS engine (a few minutes)" >&2
        if ! _build_openssl >&2; then
            echo "bootstrap: WARNING: could not build OpenSSL $OPENSSL_VERSION;" \
                 "the XTS engine links the system's libcrypto (slower)" >&2
            unset NBDSERVER_OPENSSL_PREFIX
            return 0
        fi
    fi
    export NBDSERVER_OPENSSL_PREFIX="$OPENSSL_PREFIX"
}

_build_openssl() {
    _build_openssl_tree "$OPENSSL_VERSION" "$OPENSSL_SHA256" "$OPENSSL_PREFIX" "" libcrypto
}

# VERSION SHA256 PREFIX [TARBALL] [libcrypto]: OpenSSL's FIPS provider and the `openssl`
# program that runs fipsinstall, from VERSION's source (TARBALL, a local file, or Debian's
# pool), into PREFIX; with "libcrypto", also the static libcrypto and headers the engine
# links (one build: the engine and its provider come from the same tree).
_build_openssl_tree() (
    set -euo pipefail
    local version="$1" sha256="$2" prefix="$3" local_tarball="${4:-}" with="${5:-}"
    local work tarball src
    mkdir -p "$ROOT/.cache"
    work="$(mktemp -d "$ROOT/.cache/openssl-build.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    tarball="$work/openssl.tar.gz"
    if [ -n "$local_tarball" ]; then
        cp "$local_tarball" "$tarball"
        echo "$sha256  $tarball" | sha256sum -c --quiet - ||
            { echo "bootstrap: $local_tarball does not match its SHA-256" >&2; return 1; }
    else
        _fetch_openssl_source "$version" "$sha256" "$tarball" || return 1
    fi
    tar -xzf "$tarball" -C "$work"
    src="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'openssl-*' | head -n 1)"
    cd "$src"
    # Static and position-independent (libcrypto goes into a shared extension, and the
    # program then uses this tree's libcrypto, not the system's); no atexit handler. Module
    # loading stays on: the engine dlopens fips.so in FIPS mode. The config directory is
    # for `openssl fipsinstall` only: the daemons name their configuration themselves.
    ./Configure enable-fips no-shared no-engine no-tests no-atexit \
        -fPIC --prefix="$prefix" --openssldir="$prefix/ssl" >"$work/configure.log" 2>&1 ||
        { tail -n 30 "$work/configure.log"; return 1; }
    { make -j"$(nproc)" build_generated && make -j"$(nproc)" libcrypto.a providers/fips.so apps/openssl; } \
        >"$work/make.log" 2>&1 || { tail -n 30 "$work/make.log"; return 1; }
    local stage="$work/stage"
    mkdir -p "$stage/lib/ossl-modules" "$stage/bin" "$stage/ssl"
    if [ "$with" = libcrypto ]; then
        mkdir -p "$stage/include"
        cp libcrypto.a "$stage/lib/"
        cp -r include/openssl "$stage/include/"
    fi
    cp providers/fips.so "$stage/lib/ossl-modules/"
    cp apps/openssl "$stage/bin/"
    # The module configuration belongs to this fips.so: its MAC is over these bytes, and
    # the self-tests run here once, at install, as the provider's security policy asks.
    "$stage/bin/openssl" fipsinstall -module "$stage/lib/ossl-modules/fips.so" \
        -out "$stage/ssl/fipsmodule.cnf" >"$work/fipsinstall.log" 2>&1 ||
        { cat "$work/fipsinstall.log"; return 1; }
    echo "$version" >"$stage/VERSION"
    chmod -R go-w "$stage"
    rm -rf "$prefix"
    mv "$stage" "$prefix"
)
