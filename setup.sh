#!/bin/sh
# setup.sh — install qpy's tools and run it.
#
#   ./setup.sh demo     install, lay out a demo root, run qpy on 127.0.0.1:2525
#   ./setup.sh test     install, run the whole test suite (what .ci/run calls)
#   ./setup.sh install  install only
#
# As root: Debian packages the tests need, a venv under /opt/qpy built from Debian's
# /usr/bin/python3 (every uid can execute it), launchers in /opt/qpy/bin.
# As a plain user: the same under ~/.local/qpy, no Debian packages (tests that need
# root or a missing tool skip). QPY_PREFIX overrides the prefix.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:-install}
[ $# -gt 0 ] && shift

if [ "$(id -u)" = 0 ]; then
    prefix=${QPY_PREFIX:-/opt/qpy}
    demo_root=${QPY_DEMO_ROOT:-/var/qpy-demo}
else
    prefix=${QPY_PREFIX:-$HOME/.local/qpy}
    demo_root=${QPY_DEMO_ROOT:-$HOME/qpy-demo}
fi
python=/usr/bin/python3

# Debian packages: the interpreter and venv, and the real peers the tests talk to.
debs="
    python3
    python3-venv
    swaks
    ucspi-tcp
    daemontools
    postfix
    dnsmasq-base
    mutt
    strace
    openssl
    systemd
    procps
    iproute2
    dovecot-core
    php-cli
    git-email
    bsd-mailx
    s-nail
    cron
    opendkim
    opendkim-tools
    opendmarc
    rspamd
    clamav-daemon
    clamav-milter
"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=""
    for p in $debs; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        echo "setup: installing Debian packages:$missing"
        export DEBIAN_FRONTEND=noninteractive
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        apt-get update -qq -o DPkg::Lock::Timeout=900
        # shellcheck disable=SC2086
        apt-get install -y -qq -o DPkg::Lock::Timeout=900 $missing >/dev/null
    fi
fi

# The venv: from Debian's python3, reachable by every uid (no pyenv shim, no /root).
if [ ! -x "$prefix/venv/bin/python3" ]; then
    mkdir -p "$prefix"
    $python -m venv "$prefix/venv"
fi
chmod 755 "$prefix"
venvpy="$prefix/venv/bin/python3"
stamp="$prefix/venv/.qpy-deps"
if [ ! -f "$stamp" ] || [ "$here/setup.cfg" -nt "$stamp" ]; then
    "$venvpy" -m pip install -q --upgrade pip setuptools wheel
    "$venvpy" -m pip install -q "$here[test]"
    touch "$stamp"
fi
# The package itself, copied (not linked) so that it is readable outside this checkout.
"$venvpy" -m pip install -q --no-deps --no-build-isolation --force-reinstall "$here" 2>&1 \
    | grep -v 'already\|^$' || true
site=$("$venvpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Byte code for the venv's interpreter, checked against nothing at import (no stat of
# each .py: the front ends import a dozen modules per message). The installed copy
# changes only through this script, which compiles it again (-f) every time.
"$venvpy" -m compileall -q -f --invalidation-mode unchecked-hash "$site/qpy" >/dev/null

# Launchers: absolute interpreter, isolated (-I), no site processing (-S), fixed sys.path.
# A launcher with a QPY-BUNDLE line (the injectors) gets its modules' byte code in one
# file, PREFIX/lib/bundle/NAME, written from the byte code just compiled, and the code
# that loads it (qpy.common.bundle: without it, or with an old one, it imports as usual).
mkdir -p "$prefix/bin" "$prefix/lib/bundle"
chmod 755 "$prefix/lib" "$prefix/lib/bundle"
for f in "$here"/bin/qpy-*; do
    name=$(basename "$f")
    src=$f
    if grep -q "^load('')  # QPY-BUNDLE" "$f"; then
        src="$prefix/bin/$name.src"
        "$venvpy" -I -m qpy.common.bundle "$site" "$prefix/lib/bundle/$name" <"$f" >"$src"
    fi
    sed -e "1s|.*|#!$venvpy -IS|" \
        -e "s|^sys.path\[:0\] = \[\]  # QPY-PATH|sys.path[:0] = ['$site']|" \
        "$src" > "$prefix/bin/$name.tmp"
    rm -f "$prefix/bin/$name.src"
    chmod 755 "$prefix/bin/$name.tmp"
    mv -f "$prefix/bin/$name.tmp" "$prefix/bin/$name"
done
# Data the programs read at run time: the queue layout and the service templates.
mkdir -p "$prefix/share"
rm -rf "$prefix/share/queue-layout.new" "$prefix/share/supervise.new"
cp -R "$here/queue-layout" "$prefix/share/queue-layout.new"
cp -R "$here/supervise" "$prefix/share/supervise.new"
rm -rf "$prefix/share/queue-layout" "$prefix/share/supervise"
mv "$prefix/share/queue-layout.new" "$prefix/share/queue-layout"
mv "$prefix/share/supervise.new" "$prefix/share/supervise"
# Manual pages: each program's docstring and docs/man/, rendered under the prefix; as
# root also linked into /usr/local/share/man so that `man qpy-smtpd` finds them.
"$venvpy" "$here/docs/mkman.py" "$prefix/share/man" \
    "$(sed -n 's/^version = //p' "$here/setup.cfg")"
if [ "$(id -u)" = 0 ]; then
    for page in "$prefix"/share/man/man*/*; do
        sec=$(basename "$(dirname "$page")")
        mkdir -p "/usr/local/share/man/$sec"
        ln -sf "$page" "/usr/local/share/man/$sec/$(basename "$page")"
    done
fi
chmod -R a+rX "$prefix"

case "$cmd" in
install)
    echo "setup: qpy installed in $prefix (programs in $prefix/bin)"
    ;;
demo)
    "$prefix/bin/qpy-install" "$demo_root" --smtp 127.0.0.1:2525
    echo "setup: demo root $demo_root; SMTP on 127.0.0.1:2525; Ctrl-C stops"
    exec "$prefix/bin/qpy-start" "$demo_root"
    ;;
test)
    cd "$here"
    "$prefix/venv/bin/ruff" check qpy bin tests bench
    "$prefix/venv/bin/lint-imports" --no-cache >/dev/null || "$prefix/venv/bin/lint-imports" --no-cache
    export QPY_PREFIX="$prefix"
    exec "$venvpy" -m pytest -q -p no:cacheprovider "$@" tests
    ;;
*)
    echo "usage: $0 demo|test|install" >&2
    exit 2
    ;;
esac
