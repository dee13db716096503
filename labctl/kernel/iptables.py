"""iptables and ip6tables rules of a lab node, applied with python-iptables inside its namespace.

This module is the one door importers use; the work is split by job:

* :mod:`labctl.kernel.iptrules` -- the words: errors, tokens, parsed rules, counter rows (pure);
* :mod:`labctl.kernel.iptparse` -- a rule line to a :class:`ParsedRule` (pure);
* :mod:`labctl.kernel.iptbuild` -- python-iptables objects and private libiptc handles;
* :mod:`labctl.kernel.iptapply` -- installing a batch all or nothing, naming the rule the kernel refused;
* :mod:`labctl.kernel.iptlist` -- listing with counters, flushing, deleting by text;
* :mod:`labctl.kernel.iptsync` -- converging a node's rules to the file's (untouched when equal).

Every function takes ``family``: ``"ip"`` (iptables, the default) or
``"ip6"`` (ip6tables: ``iptc.Table6``/``Rule6``, libip6tc,
``/proc/net/ip6_tables_*``).

Rules are written the way people write them on a command line
(``-t nat -A POSTROUTING -o eth1 -j MASQUERADE``).  :func:`parse_rule` turns
such a line into a :class:`ParsedRule` without touching the kernel;
:func:`apply_rules` builds python-iptables objects from it and installs a
node's rules as one batch per table.

Backend.  python-iptables drives *libiptc*, i.e. the **legacy xtables**
backend (``setsockopt(IPT_SO_SET_REPLACE)``), not nf_tables.  Inside the node's
namespace ``iptables-legacy -L``/``iptables-legacy-save`` show the rules and
counters; ``iptables`` (the nft variant, the distribution default) shows empty
chains and warns that legacy tables are present.  Both backends can coexist in
one namespace; their hooks simply both run.

Namespaces.  libiptc opens its raw socket in ``iptc_init`` (python-iptables
``Table.refresh``) and keeps it in the handle until ``iptc_free``; the socket
stays in the namespace it was created in.  So every handle here is opened
while the thread is inside :func:`labctl.kernel.netns.entered`, and the kernel
side of a commit lands in that namespace even though the process lives in the
root namespace (tests check the root namespace is unchanged).

python-iptables' process-wide table cache would mix namespaces and
instantiate every table wherever the thread is: :mod:`labctl.kernel.iptbuild`
says why private handles are used instead.

Kernel modules.  This kernel is monolithic (``CONFIG_MODULES`` is not set):
xt_physdev, xt_mark, nf_nat, xt_NFLOG, br_netfilter ... are built in, there is
no ``/lib/modules`` and nothing to ``modprobe``; a missing extension shows up as
a commit error (``/proc/net/ip_tables_matches``, ``ip6_tables_matches`` and their
``..._targets`` list what the kernel knows; see :mod:`labctl.kernel.xtables`).
"""

from __future__ import annotations

from labctl.kernel.iptapply import apply_rules, replace_rules
from labctl.kernel.iptbuild import build_rule
from labctl.kernel.iptlist import delete_where, existing_tables, existing_tables_here, flush, list_rules, rule_text
from labctl.kernel.iptparse import parse_rule
from labctl.kernel.iptrules import (
    FAMILIES,
    TABLES,
    TOOL,
    Command,
    Extension,
    Family,
    Option,
    ParsedRule,
    RuleCounter,
    RuleError,
    Token,
    tokenize,
)
from labctl.kernel.iptsync import converge

__all__ = [
    "FAMILIES",
    "TABLES",
    "TOOL",
    "Command",
    "Extension",
    "Family",
    "Option",
    "ParsedRule",
    "RuleCounter",
    "RuleError",
    "Token",
    "apply_rules",
    "build_rule",
    "converge",
    "delete_where",
    "existing_tables",
    "existing_tables_here",
    "flush",
    "list_rules",
    "parse_rule",
    "replace_rules",
    "rule_text",
    "tokenize",
]
