# SPDX-License-Identifier: GPL-2.0-or-later
# topowatch: what the NetworkManager, strongSwan and ppp hooks share. Sourced by each hook (never
# run); installed as /usr/lib/topowatch/hook-lib.sh. The hook sets `hook` (its name in the log)
# and then calls `notify KIND INTERFACE DETAIL`.
#
# notify asks the topowatch daemon of this network namespace over D-Bus for a full judgement
# (TriggerEvent: the daemon re-reads the topology and the ruleset and judges every eligible
# entry), waiting at most about two seconds, so the caller is never held up for long. The daemon's
# name comes from `topowatch bus-name`, the one mapping the daemon and the CLI use too
# (io.github.topowatch in the init namespace, io.github.topowatch.netns_<escaped name> inside
# `ip netns exec NAME`); TOPOWATCH_BUS_NAME overrides it. A call that fails is logged to syslog
# (logger, tag topowatch-hook) with the bus tool's error.
#
# When the daemon is not running (its name has no owner on the system bus, there is no system
# bus, or no busctl/dbus-send to ask with), TOPOWATCH_HOOK_FALLBACK decides:
#   none   (default) do nothing: the daemon judges the table when it starts;
#   flush  run a one-shot `topowatch flush` in the background, bounded by a timeout (it deletes
#          only stale entries, by the policies in force); asking costs up to one more second.
# Set it in /etc/default/topowatch as a line `TOPOWATCH_HOOK_FALLBACK=flush` (the file is read,
# never executed; TOPOWATCH_HOOK_CONFIG names another file), or in the environment. A daemon
# that runs but refuses the call (bus policy) or does not answer in time gets no fallback: it
# sees the kernel's events itself. The flush never runs while the daemon holds its name.

readonly BUS_PATH=/io/github/topowatch
readonly BUS_IFACE=io.github.topowatch.Agent1
# The program: TOPOWATCH, else this installation's (this file is PREFIX/lib/topowatch/hook-lib.sh,
# the program PREFIX/bin/topowatch: a virtualenv's is on no PATH), else the one on PATH.
case ${lib:-} in
    */lib/topowatch/hook-lib.sh) own=${lib%/lib/topowatch/hook-lib.sh}/bin/topowatch ;;
    *) own="" ;;
esac
if [ -n "${TOPOWATCH:-}" ]; then
    topowatch=$TOPOWATCH
elif [ -n "$own" ] && [ -x "$own" ]; then
    topowatch=$own
else
    topowatch=topowatch
fi
hook=${hook:-topowatch-hook}

say() {
    if command -v logger >/dev/null 2>&1; then
        logger -t topowatch-hook -p daemon.notice -- "$hook: $*" 2>/dev/null || echo "$hook: $*" >&2
    else
        echo "$hook: $*" >&2
    fi
}

# An interface name as the kernel accepts it: 1-15 bytes, no '/', ':' or blanks.
valid_ifname() {
    case $1 in
        "" | . | .. | */* | *:* | *[[:space:]]*) return 1 ;;
    esac
    [ "${#1}" -le 15 ]
}

fallback_mode() {
    mode=${TOPOWATCH_HOOK_FALLBACK:-}
    conf=${TOPOWATCH_HOOK_CONFIG:-/etc/default/topowatch}
    if [ -z "$mode" ] && [ -r "$conf" ]; then
        mode=$(sed -n 's/^[[:space:]]*TOPOWATCH_HOOK_FALLBACK=["'\'']\{0,1\}\([a-z]*\).*/\1/p' "$conf" | tail -n 1)
    fi
    case ${mode:-none} in
        flush) echo flush ;;
        none) echo none ;;
        *) say "unknown TOPOWATCH_HOOK_FALLBACK '$mode'; doing nothing"; echo none ;;
    esac
}

# resolve_bus_name: set bus_name to the daemon's name in this network namespace; false when
# topowatch cannot say (not installed, or failed).
resolve_bus_name() {
    if [ -n "${TOPOWATCH_BUS_NAME:-}" ]; then
        bus_name=$TOPOWATCH_BUS_NAME
        return 0
    fi
    bus_name=$(timeout 5 "$topowatch" bus-name 2>/dev/null) && [ -n "$bus_name" ]
}

# trigger KIND INTERFACE DETAIL: ask the daemon to react; false when it cannot be reached, with
# the reason in $error.
trigger() {
    if command -v busctl >/dev/null 2>&1; then
        error=$(timeout 2 busctl --system --timeout=2 call "$bus_name" "$BUS_PATH" "$BUS_IFACE" \
            TriggerEvent sss "$1" "$2" "$3" 2>&1 >/dev/null)
    elif command -v dbus-send >/dev/null 2>&1; then
        error=$(timeout 2 dbus-send --system --print-reply --reply-timeout=2000 --dest="$bus_name" \
            "$BUS_PATH" "$BUS_IFACE.TriggerEvent" "string:$1" "string:$2" "string:$3" 2>&1 >/dev/null)
    else
        error="neither busctl nor dbus-send is installed"
        return 1
    fi
    status=$?
    case $status in
        0) return 0 ;;
        124) error="no answer within 2 s" ;;
        *) error=$(printf '%s' "${error:-exit status $status}" | tr -d '\000-\037' | cut -c1-200) ;;
    esac
    return 1
}

# daemon_state: is the daemon's name owned on the system bus? "running" (it is: the call was
# refused or not answered in time), "stopped" (no owner, or no system bus and so no daemon on
# one, or no tool to ask with) or "unknown" (the bus itself did not answer within a second).
daemon_state() {
    if command -v busctl >/dev/null 2>&1; then
        answer=$(timeout 1 busctl --system --timeout=1 call org.freedesktop.DBus /org/freedesktop/DBus \
            org.freedesktop.DBus NameHasOwner s "$bus_name" 2>/dev/null)
        status=$?
    elif command -v dbus-send >/dev/null 2>&1; then
        answer=$(timeout 1 dbus-send --system --print-reply --reply-timeout=1000 \
            --dest=org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus.NameHasOwner \
            "string:$bus_name" 2>/dev/null)
        status=$?
    else
        echo stopped
        return 0
    fi
    case $status:$answer in
        0:*true*) echo running ;;
        0:*false*) echo stopped ;;
        124:*) echo unknown ;;
        *) echo stopped ;;
    esac
}

# notify KIND INTERFACE DETAIL: trigger, else the configured fallback, only when the daemon is not
# running; never blocks for long (the flush runs in the background).
notify() {
    if ! resolve_bus_name; then
        say "'$topowatch bus-name' failed: cannot tell the daemon's D-Bus name; not asking it ($1 '$2' $3)"
        return 0
    fi
    if trigger "$@"; then
        return 0
    fi
    say "TriggerEvent $1 '$2' $3 to $bus_name failed: $error"
    if [ "$(fallback_mode)" != flush ]; then
        return 0
    fi
    case $(daemon_state) in
        running) say "the daemon did not take the request ($1 $2 $3): refused or no answer in time; it is running, so no flush" ;;
        unknown) say "the system bus did not answer ($1 $2 $3): cannot tell whether the daemon runs; no flush" ;;
        *)
            say "daemon not running ($1 $2 $3): one-shot flush"
            (timeout 60 "$topowatch" flush </dev/null >/dev/null 2>&1 &)
            ;;
    esac
    return 0
}
