# shellcheck shell=bash
# Sourced by scripts/demo and scripts/test, from the repo root. `reactor_python EXTRAS` (EXTRAS: '' or
# 'test') sets PY to a Python 3.11+ with the project installed. Inside a virtual environment that is its
# python; otherwise it is the project's own .venv, made from ${PYTHON:-python3}, because a distribution's
# python3 refuses a system-wide pip install (PEP 668, externally-managed-environment). Re-runs reuse .venv
# and skip pip while pyproject.toml is unchanged; `rm -rf .venv` starts over. REACTOR_SKIP_INSTALL=1
# sets nothing up: no venv is made, no pip (an existing .venv is still used).

reactor_venv_die() {
    echo "scripts/${0##*/}: $*" >&2
    exit 1
}

reactor_python() {
    local extras=$1 base=${PYTHON:-python3}
    # an activated venv whose python is not first on PATH (pyenv shims, say) is still the one meant
    if [ -z "${PYTHON:-}" ] && [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        base=$VIRTUAL_ENV/bin/python
    fi
    command -v "$base" >/dev/null 2>&1 \
        || reactor_venv_die "no Python interpreter '$base' (install Python 3.11+, or set PYTHON=/path/to/python3)"
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        local version
        version=$("$base" -c 'import sys; print("Python", sys.version.split()[0])' 2>/dev/null) \
            || version="not a working Python"
        reactor_venv_die "$base is $version; reactor needs Python 3.11+ (set PYTHON=/path/to/python3.11 or newer)"
    fi

    if "$base" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
        PY=$base    # already a virtual environment: install into it, as before (it is the user's own)
        if [ "${REACTOR_SKIP_INSTALL:-0}" != 1 ]; then
            "$PY" -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
        fi
        return
    fi

    # .venv is reused when it runs on the same base interpreter; made by another (or broken), it is remade
    # (sys._base_executable: in a venv, the interpreter it was made from; private, hence the getattr)
    local want ident='import os, sys
print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), sys.version.split()[0])'
    want=$("$base" -c "$ident")
    if [ "$(.venv/bin/python -c "$ident" 2>/dev/null)" != "$want" ]; then
        if [ "${REACTOR_SKIP_INSTALL:-0}" = 1 ]; then
            PY=$base    # no set-up at all: the interpreter is used as it is, as before .venv
            return
        fi
        reactor_venv_check_venv_module "$base"
        echo "scripts/${0##*/}: creating .venv with $base ($want)" >&2
        "$base" -m venv --clear .venv || reactor_venv_die "could not create .venv with $base"
    fi
    PY=$PWD/.venv/bin/python
    [ "${REACTOR_SKIP_INSTALL:-0}" = 1 ] && return

    # one stamp per extras; it holds a hash of pyproject.toml and of where the repo is (editable install)
    local stamp=.venv/.reactor-installed${extras:+-$extras} sum
    sum=$("$PY" -c 'import hashlib, os; print(hashlib.sha256(open("pyproject.toml", "rb").read()
        + os.getcwd().encode()).hexdigest())')
    if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
        rm -f .venv/.reactor-installed*    # whatever they recorded is stale now
        "$PY" -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
        echo "$sum" >"$stamp"
        # the test extras include the plain install
        [ -n "$extras" ] && echo "$sum" >.venv/.reactor-installed
    fi
    return 0
}

# `python -m venv` needs the venv module and ensurepip (to put pip in .venv); Debian and Ubuntu ship
# them apart from python3, in python3-venv, which root installs here when apt-get is there.
reactor_venv_check_venv_module() {
    local base=$1 probe='import venv, ensurepip'
    "$base" -c "$probe" 2>/dev/null && return
    local pkg
    pkg=python$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        && "$base" -c 'import sys; sys.exit(sys.base_prefix != "/usr")'; then
        echo "scripts/${0##*/}: $base has no venv/ensurepip: installing $pkg (Debian package)" >&2
        apt-get update -qq || echo "scripts/${0##*/}: apt-get update failed" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null \
            || echo "scripts/${0##*/}: could not install $pkg" >&2
        "$base" -c "$probe" 2>/dev/null && return
    fi
    reactor_venv_die "$base cannot create a virtual environment (no venv or ensurepip module)." \
        "On Debian/Ubuntu: apt-get install python3-venv (or $pkg); or set PYTHON to another Python 3.11+."
}
