#!/usr/bin/env bash
# Run the test suite as an aarch64 process under QEMU user mode (`make test-arm64`).
#
# On an x86-64 Debian host with root, apt and PyPI this:
#   1. installs qemu-user-static >= 8.1 (from <codename>-backports when the release has
#      an older one: before 8.1 QEMU ignores IC IVAU, so code written through a second
#      mapping runs stale; QEMU issue 1034) and registers it with binfmt_misc;
#   2. builds an arm64 Debian bookworm root file system (debootstrap --foreign, then the
#      second stage run through binfmt) and caches it;
#   3. cross-builds keystone-engine 0.9.2 for aarch64 from the PyPI sdist with Debian's
#      g++-aarch64-linux-gnu (PyPI has no aarch64 wheel; building it emulated takes
#      about 40 minutes) and caches the wheel;
#   4. copies the checkout (git ls-files) into the root file system and runs `make test`
#      there, in a venv kept in the root file system between runs.
#
# Usage: .ci/arm64.sh                 the whole suite (`make test`)
#        .ci/arm64.sh PYTEST-ARGS...  pytest with these arguments instead
#        .ci/arm64.sh --can-run       exit 0 if this host can run it, else print why not
#
# The cache (EXECMEM_ARM64_CACHE, default /var/cache/execmem-arm64) is outside the
# checkout, since CI uses a clean one.  Every cached item is built under a temporary
# name and renamed when complete, so an interrupted run leaves nothing half-built that
# a later run would trust; mounts live in a private mount namespace and vanish with it;
# a lock serializes concurrent runs.  `rm -rf /var/cache/execmem-arm64` starts cold.
set -euo pipefail

CACHE=${EXECMEM_ARM64_CACHE:-/var/cache/execmem-arm64}
SUITE=bookworm                 # the guest release: Python 3.11, as the wheel below
KEYSTONE=keystone-engine==0.9.2
KEYSTONE_SHA256=2f7af62dab0ce6c2732dbb4f31cfa2184a8a149e280b96b92ebc0db84c6e50f5
QEMU_MIN=8.1
ROOTFS=$CACHE/rootfs-$SUITE
WHEELS=$CACHE/wheels
GUEST_SRC=/src/execmem         # the checkout's copy inside the root file system
GUEST_VENV=/opt/execmem-venv   # kept between runs (pip's cache is in the root fs too)
TIMEOUT=${EXECMEM_ARM64_TIMEOUT:-3600}  # seconds for the emulated test run, at most...
DEADLINE=${EXECMEM_ARM64_DEADLINE:-}    # ...and it ends by this time (seconds since 1970), if set
CHECKOUT=$(cd "$(dirname "$0")/.." && pwd)

say() { printf '[arm64 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

why_not() {
    [ "$(uname -s)" = Linux ] || { echo "not Linux"; return; }
    [ "$(uname -m)" = x86_64 ] || { echo "host is $(uname -m), not x86-64"; return; }
    [ "$(id -u)" = 0 ] || { echo "not root (debootstrap, chroot and binfmt_misc need it)"; return; }
    command -v apt-get >/dev/null || { echo "no apt-get"; return; }
    grep -qs '^ID=debian' /etc/os-release || { echo "not Debian"; return; }
}

if [ "${1:-}" = --can-run ]; then
    reason=$(why_not)
    [ -z "$reason" ] || { echo "$reason"; exit 1; }
    exit 0
fi
reason=$(why_not)
[ -z "$reason" ] || die "cannot run the arm64 suite here: $reason"

mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock -n 9 || { say "another run holds $CACHE/lock; waiting"; flock 9; }

# --- host packages -----------------------------------------------------------------

# The Debian mirror the host already uses (deb822 or one-line sources).
host_mirror() {
    local found
    found=$({ sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | tr ' ' '\n'
              awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' \
                  /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
            } | grep -v security | grep -E '/debian/?$' | head -n 1 || true)
    echo "${found:-http://deb.debian.org/debian}"
}
MIRROR=${EXECMEM_ARM64_MIRROR:-$(host_mirror)}

# "X.Y" of the installed qemu-aarch64-static, or nothing.
qemu_version() {
    command -v qemu-aarch64-static >/dev/null || return 0
    qemu-aarch64-static --version | sed -n '1s/^qemu-aarch64 version \([0-9]*\.[0-9]*\).*/\1/p'
}
recent_enough() {  # X.Y >= QEMU_MIN
    [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$QEMU_MIN" "$1" | sort -V | head -1)" = "$QEMU_MIN" ]
}

HOST_PACKAGES=(debootstrap g++-aarch64-linux-gnu cmake make
               python3-pip python3-setuptools python3-wheel)
missing=()
for p in "${HOST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
if [ ${#missing[@]} -gt 0 ] || ! recent_enough "$(qemu_version)"; then
    say "installing host packages: ${missing[*]} qemu-user-static"
    apt-get update -qq
    [ ${#missing[@]} -eq 0 ] || apt-get install -y -qq "${missing[@]}" >/dev/null
    apt-get install -y -qq qemu-user-static >/dev/null
    if ! recent_enough "$(qemu_version)"; then
        codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
        say "QEMU $(qemu_version) < $QEMU_MIN; adding $codename-backports ($MIRROR)"
        cat > /etc/apt/sources.list.d/execmem-backports.sources <<EOF
Types: deb
URIs: $MIRROR
Suites: $codename-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        apt-get update -qq
        apt-get install -y -qq -t "$codename-backports" qemu-user-static >/dev/null
    fi
fi
recent_enough "$(qemu_version)" || die "QEMU $(qemu_version) is older than $QEMU_MIN"
say "QEMU $(qemu_version)"

# --- binfmt_misc -------------------------------------------------------------------

[ -e /proc/sys/fs/binfmt_misc/register ] ||
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
    die "cannot mount binfmt_misc"
# Debian's QEMU ships its registration for systemd-binfmt, which a container or a
# machine without systemd never runs: register it here.  Again when the interpreter
# changed since (the F flag pins the file that was open at registration, maybe an
# older QEMU's), but not on every run: a run in progress could not start a process
# between the removal and the new registration.
BINFMT_CONF=/usr/lib/binfmt.d/qemu-aarch64.conf
BINFMT=/proc/sys/fs/binfmt_misc/qemu-aarch64
BINFMT_STAMP=/run/execmem-arm64-binfmt  # /run is emptied at boot, as binfmt_misc is
[ -r "$BINFMT_CONF" ] || die "$BINFMT_CONF is missing (qemu-user-binfmt)"
registration=$(grep -v '^#' "$BINFMT_CONF" | head -n 1)
interpreter=$(printf '%s' "$registration" | cut -d: -f7)
if [ ! -e "$BINFMT" ] || ! grep -qx enabled "$BINFMT" || ! grep -qx "interpreter $interpreter" "$BINFMT" ||
   [ ! -e "$BINFMT_STAMP" ] || [ "$interpreter" -nt "$BINFMT_STAMP" ]; then
    [ ! -e "$BINFMT" ] || echo -1 > "$BINFMT"
    printf '%s\n' "$registration" > /proc/sys/fs/binfmt_misc/register
    touch "$BINFMT_STAMP"
fi
grep -qx enabled "$BINFMT" || die "qemu-aarch64 is not enabled in binfmt_misc"

# Run a command in a private mount namespace (its mounts vanish with it, even when the
# run is interrupted) and a PID namespace (no emulated process outlives it).
isolated() { unshare --mount --propagation private --pid --fork --kill-child -- "$@"; }

# --- the root file system ----------------------------------------------------------

if [ ! -d "$ROOTFS" ]; then
    partial=$ROOTFS.partial
    rm -rf --one-file-system "$partial"
    say "debootstrap $SUITE arm64, first stage ($MIRROR)"
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include=python3-venv,ca-certificates,make "$SUITE" "$partial" "$MIRROR" >/dev/null
    say "debootstrap second stage, emulated (minutes)"
    isolated chroot "$partial" /debootstrap/debootstrap --second-stage >/dev/null
    chroot "$partial" apt-get clean
    mv "$partial" "$ROOTFS"
fi
# pip inside must trust what the host trusts (a proxy's CA, if any) and resolve names.
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"

# --- keystone-engine for aarch64 ---------------------------------------------------

if ! ls "$WHEELS"/keystone_engine-*aarch64.whl >/dev/null 2>&1; then
    build=$CACHE/keystone.partial
    rm -rf "$build" && mkdir -p "$build"
    say "cross-building $KEYSTONE for aarch64 (minutes)"
    echo "$KEYSTONE --hash=sha256:$KEYSTONE_SHA256" > "$build/requirements.txt"
    /usr/bin/python3 -m pip download --quiet --isolated --no-deps --no-binary :all: \
        --require-hashes -r "$build/requirements.txt" -d "$build"
    tar -C "$build" -xzf "$build"/keystone-engine-0.9.2.tar.gz
    src=$build/keystone-engine-0.9.2
    mkdir -p "$src/src/build"
    # PYTHON_EXECUTABLE: LLVM's configure must not pick up a python2 shim from PATH.
    if ! (cd "$src/src/build" && cmake -G 'Unix Makefiles' -DBUILD_LIBS_ONLY=1 -DBUILD_SHARED_LIBS=ON \
            -DCMAKE_BUILD_TYPE=Release -DLLVM_TARGETS_TO_BUILD=all \
            -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
            -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
            -DPYTHON_EXECUTABLE=/usr/bin/python3 .. &&
          make -j"$(nproc)" keystone &&
          # setup.py's build step reruns make-share.sh in src/build: cmake keeps the
          # cached cross compilers and make finds nothing left to do.
          cd "$src" && /usr/bin/python3 setup.py bdist_wheel --plat-name manylinux2014_aarch64
         ) > "$build/build.log" 2>&1; then
        tail -n 30 "$build/build.log" >&2
        die "the keystone cross build failed (log: $build/build.log)"
    fi
    wheel=$(ls "$src"/dist/keystone_engine-*aarch64.whl)
    # e_machine (offset 18 of the ELF header) must be EM_AARCH64 = 183.
    (cd "$build" && /usr/bin/python3 -m zipfile -e "$wheel" unpacked)
    [ "$(od -An -tu2 -j18 -N2 "$build/unpacked/keystone/libkeystone.so" | tr -d ' ')" = 183 ] ||
        die "the keystone wheel does not hold an aarch64 libkeystone.so"
    mkdir -p "$WHEELS.partial" && cp "$wheel" "$WHEELS.partial/"
    rm -rf "$WHEELS" && mv "$WHEELS.partial" "$WHEELS"
    rm -rf "$build"
fi
rm -rf "$ROOTFS/wheels" && cp -r "$WHEELS" "$ROOTFS/wheels"

# --- the project, and the run ------------------------------------------------------

say "copying the checkout (git ls-files) to $GUEST_SRC"
rm -rf --one-file-system "$ROOTFS$GUEST_SRC" && mkdir -p "$ROOTFS$GUEST_SRC"
(cd "$CHECKOUT" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi  # skip deleted files
    done |
    tar --null -T - -cf -) | tar -C "$ROOTFS$GUEST_SRC" -xf -

# The venv's editable install points at $GUEST_SRC, so a new copy needs no reinstall
# unless pyproject.toml changed (its fresh mtime would make make reinstall: ~5 min).
if cmp -s "$CHECKOUT/pyproject.toml" "$ROOTFS$GUEST_VENV/installed-pyproject.toml"; then
    touch -r "$ROOTFS$GUEST_VENV/.installed" "$ROOTFS$GUEST_SRC/pyproject.toml"
fi
install="make $GUEST_VENV/.linked VENV=$GUEST_VENV && cp pyproject.toml $GUEST_VENV/installed-pyproject.toml"
if [ $# -gt 0 ]; then
    run="$install && $GUEST_VENV/bin/python -m pytest$(printf ' %q' "$@")"
else
    run="$install && make test VENV=$GUEST_VENV"
fi
# keystone has no aarch64 wheel on PyPI: never let pip build its sdist emulated.
guest_env=(HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 TERM="${TERM:-dumb}"
           PIP_FIND_LINKS=/wheels PIP_ONLY_BINARY=keystone-engine PIP_DISABLE_PIP_VERSION_CHECK=1
           EXECMEM_TEST_SLOWDOWN=10   # tests' hang bounds (tests/programs.py SLOWDOWN)
           EXECMEM_TEST_QEMU_USER=1   # what the emulator cannot give (tests/programs.py near_libc)
           # A test still running after 15 min prints every thread's stack: a hang in
           # CI's log says where it is (the longest test takes a few minutes here).
           PYTEST_ADDOPTS="-o faulthandler_timeout=900")
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -z "${!v:-}" ] || guest_env+=("$v=${!v}")
done

if [ -n "$DEADLINE" ]; then
    left=$((DEADLINE - $(date +%s)))
    [ "$left" -gt 60 ] || die "no time left before EXECMEM_ARM64_DEADLINE for the emulated run"
    [ "$left" -ge "$TIMEOUT" ] || TIMEOUT=$left
fi
say "running as aarch64 under QEMU (at most $((TIMEOUT / 60)) min): $run"
start=$SECONDS
status=0
isolated bash -c '
    set -e
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs -o mode=1777,nosuid,nodev shm "$root/dev/shm"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$root/tmp"
    chroot "$root" /usr/bin/env -i "$@"
' arm64-suite "$ROOTFS" "${guest_env[@]}" \
    timeout --kill-after=60 "$TIMEOUT" bash -c "uname -m && cd $GUEST_SRC && $run" || status=$?
say "emulated run took $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s; exit status $status"
[ "$status" -ne 124 ] || say "error: the emulated run was stopped after $TIMEOUT s (EXECMEM_ARM64_TIMEOUT / _DEADLINE)"
exit "$status"
