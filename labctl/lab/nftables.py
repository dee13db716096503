"""Converge a node's nftables ruleset: same -> nothing, changed -> replaced atomically, gone -> removed.

"Same" is decided by the kernel: the file's ruleset is loaded into a scratch
namespace and listed back (stateless, no handles), and compared with the
node's own tables listed the same way.  A ruleset edited by hand in the node
is therefore put back, and an unchanged one keeps its counters.
"""

from __future__ import annotations

from collections.abc import Collection

from labctl.kernel import nft


def own_tables(tables: Collection[tuple[str, str]], keep_ebtables: bool) -> list[tuple[str, str]]:
    """The tables of a node that its ``nftables:`` owns (ebtables-nft's are its ``ebtables:``'s)."""
    return [t for t in tables if not (keep_ebtables and t in nft.EBTABLES_TABLES)]


def converge(
    namespace: str, wanted: str | None, tables: Collection[tuple[str, str]], keep_ebtables: bool
) -> str | None:
    """Bring the node's ruleset to ``wanted``; what was done ("loaded", "replaced", "removed") or None."""
    own = own_tables(tables, keep_ebtables)
    if wanted is None:
        if not own:
            return None
        nft.remove(namespace, keep_ebtables)
        return "removed"
    if own and nft.current(namespace, keep_ebtables) == nft.canonical(wanted):
        return None
    nft.replace(namespace, wanted, keep_ebtables)
    return "replaced" if own else "loaded"
