# Sourced by scripts/demo, scripts/test, scripts/bench: makes this machine ready to run the project.
# Idempotent: Debian packages are installed only when missing, the venv is made once, and the
# editable install is redone only when the build inputs change (a stamp of their hash).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
source "$ROOT/scripts/lib/openssl.sh"
source "$ROOT/scripts/lib/fips.sh"

# Debian packages the project and its real-client tests use.
DEB_PACKAGES=(
    python3 python3-venv python3-dev python3-libnbd gcc make perl curl ca-certificates libssl-dev
    libnbd-bin fuse3 qemu-utils fio nbdkit nbd-client
    e2fsprogs util-linux cryptsetup-bin openssl kmod iproute2 procps
    systemd
    # A throwaway single-node Ceph cluster for disks on RBD (tests/helpers/ceph.py).
    ceph-mon ceph-osd ceph-common python3-rbd python3-rados
    # RSA-HSM keys: a real PKCS#11 token for the tests and the demo (tests/helpers/softhsm.py).
    softhsm2 p11-kit p11-kit-modules
    # State on PostgreSQL: a throwaway server for the tests and the demo (tests/helpers/postgres.py).
    postgresql
    qemu-block-extra  # qemu's rbd driver: the bench's qemu-nbd peers on RBD (bench/targets.py)
)

bootstrap_debs() {
    local missing=()
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
        if [ "$(id -u)" -ne 0 ]; then
            echo "bootstrap: need root to install Debian packages" >&2; return 1
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

bootstrap_venv() {
    # Debian's python3 because python3-libnbd is built for it; --system-site-packages to import `nbd`.
    if [ ! -x "$VENV/bin/python" ]; then
        echo "bootstrap: creating $VENV" >&2
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
    fi
    local stamp="$VENV/.install-stamp" want
    # The build inputs: a change to any of them re-runs the editable install (and the C build).
    # The libcrypto the engine links (scripts/lib/openssl.sh) is one of them.
    want="$(cd "$ROOT" && { cat pyproject.toml $(ls setup.py nbdserver/*.c nbdserver/*.h nbdserver/crypto/*.c 2>/dev/null)
                            echo "openssl=${NBDSERVER_OPENSSL_PREFIX:-system}"; } | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "bootstrap: installing the project into $VENV" >&2
        "$VENV/bin/python" -m pip install -q --upgrade pip >&2
        (cd "$ROOT" && "$VENV/bin/python" -m pip install -q -e '.[test]' >&2)
        echo "$want" > "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}

bootstrap_js_sdk() {
    # The Azure SDK for JavaScript that tests/keyservice/test_ks_azure_js_sdk.py drives, from
    # the committed lock file, into its git-ignored node_modules; again only when the lock
    # changes. Optional: without node and npm, or when npm fails (offline), that test skips.
    local dir="$ROOT/tests/keyservice/js" stamp want
    command -v node >/dev/null && command -v npm >/dev/null || return 0
    stamp="$dir/node_modules/.install-stamp"
    want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
    [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
    echo "bootstrap: installing the Azure SDK for JavaScript into $dir/node_modules" >&2
    if (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2); then
        echo "$want" > "$stamp"
    else
        echo "bootstrap: npm ci failed; the JavaScript SDK test will skip" >&2
    fi
}

bootstrap() {
    bootstrap_debs
    bootstrap_openssl
    bootstrap_fips
    bootstrap_venv
    bootstrap_js_sdk
}
