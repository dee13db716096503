"""The tracer's match words, translated: an iptables match (``-p udp --dport 53``) for ip6tables and ebtables.

A check's trace match is written once, in iptables syntax; the hook tracer
puts it on every table it traces, so it is said again for ip6tables
(:func:`ip6_match`) and for ebtables' IPv4 or IPv6 frames (:func:`ebtables_match`).
"""

from __future__ import annotations

import shlex

_EB_TRANSLATION = {
    "-s": "--ip-src",
    "--source": "--ip-src",
    "-d": "--ip-dst",
    "--destination": "--ip-dst",
    "--sport": "--ip-sport",
    "--dport": "--ip-dport",
}


def ebtables_match(match: str, family: str = "ip") -> str:
    """Translate a simple iptables match (``-p udp --dport 53 -d 10.0.0.1``) to ebtables.

    Only the words listed in ``_EB_TRANSLATION`` and ``-p`` are understood;
    anything else needs an explicit ``bridge_match``.  ``family`` ``ip6``
    matches IPv6 frames instead (``-p IPv6 --ip6-proto udp --ip6-dport 53``;
    ``-p icmp`` becomes ICMPv6 echo requests, as in :func:`ip6_match`).
    """
    from labctl.kernel import iptables  # python-iptables: imported only when rules are made

    words = iptables.tokenize(match)
    if not words:
        return ""
    six = family == "ip6"
    out = ["-p", "IPv6" if six else "IPv4"]
    i = 0
    while i < len(words):
        word = words[i].value
        if i + 1 >= len(words):
            raise ValueError(f"cannot translate {match!r} for ebtables; pass bridge_match")
        value = words[i + 1].value
        if word in ("-p", "--protocol"):
            if six and value in ("icmp", "1"):
                out += ["--ip6-proto", "ipv6-icmp", "--ip6-icmp-type", "echo-request"]
            else:
                out += ["--ip6-proto" if six else "--ip-proto", value]
        elif word in _EB_TRANSLATION and six and word in ("-s", "--source", "-d", "--destination") and ":" not in value:
            pass  # an IPv4 address matches no IPv6 frame (as ip6_match leaves it out)
        elif word in _EB_TRANSLATION:
            out += [_EB_TRANSLATION[word].replace("--ip-", "--ip6-") if six else _EB_TRANSLATION[word], value]
        else:
            raise ValueError(f"cannot translate {word!r} for ebtables; pass bridge_match")
        i += 2
    return " ".join(out)


def ip6_match(match: str) -> str:
    """An iptables trace match (``-p icmp``, ``-p udp --dport 53``) for ip6tables.

    ``-p icmp`` becomes ``-p icmpv6 --icmpv6-type echo-request`` (the pings
    a check sends, not the neighbour discovery ICMPv6 also carries); IPv4
    addresses (``-s``/``-d``) cannot match an IPv6 packet and are left out.
    """
    from labctl.kernel import iptables  # python-iptables: imported only when rules are made

    words = [t.value for t in iptables.tokenize(match)]
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        value = words[i + 1] if i + 1 < len(words) else None
        if word in ("-p", "--protocol") and value in ("icmp", "1"):
            out += ["-p", "icmpv6", "--icmpv6-type", "echo-request"]
            i += 2
        elif word in ("-s", "--source", "-d", "--destination") and value is not None and ":" not in value:
            i += 2
        else:
            out.append(word)
            i += 1
    return " ".join(w if w == "!" else shlex.quote(w) for w in out)
