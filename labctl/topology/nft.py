"""A node's ``nftables:`` ruleset, as nft writes it: one text, or a list of commands (one per line).

The model only normalises the shape; whether nft and the kernel accept it is
asked of libnftables in a scratch namespace before anything is built
(``labctl.lab.labfile``), so the error is nft's own, at the lab file's line.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import PlainValidator

MAX_RULESET_CHARS = 256 * 1024
"""A lab's ruleset is a few dozen lines; the cap keeps a mistaken paste from reaching the kernel."""

FAMILY_OPTIONS = {
    "ip": "CONFIG_NF_TABLES_IPV4",
    "ip6": "CONFIG_NF_TABLES_IPV6",
    "inet": "CONFIG_NF_TABLES_INET",
    "arp": "CONFIG_NF_TABLES_ARP",
    "bridge": "CONFIG_NF_TABLES_BRIDGE",
    "netdev": "CONFIG_NF_TABLES_NETDEV",
}
"""The kernel option each nft table family needs (besides CONFIG_NF_TABLES)."""

_INCLUDE = re.compile(r"(?:^|[\s;{}])include\s", re.MULTILINE)
_TABLE_WORD = re.compile(r"(?:^|[\s;{])table\s+(?P<family>ip6?|inet|arp|bridge|netdev)\s+\S")


def _ruleset(value: Any) -> str:
    """A ruleset text from a string or a list of command strings (each a line)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = "\n".join(value)
    else:
        raise ValueError("nftables is a ruleset text (nft -f syntax) or a list of nft commands")
    if not text.strip():
        raise ValueError("an empty ruleset: leave nftables out instead")
    if len(text) > MAX_RULESET_CHARS:
        raise ValueError(f"a ruleset of {len(text)} characters (at most {MAX_RULESET_CHARS})")
    if _INCLUDE.search(text):
        # nft would read (and quote in its errors) any file of the host, as root
        raise ValueError("include is not allowed: a lab's ruleset is all in the lab file")
    return text if text.endswith("\n") else text + "\n"


NftRuleset = Annotated[str, PlainValidator(_ruleset)]


def families(text: str) -> set[str]:
    """The table families a ruleset names (``table inet filter {``, ``add table ip nat``)."""
    return {m["family"] for m in _TABLE_WORD.finditer(text)}


def requirements(text: str) -> list[str]:
    """Kernel options a ruleset needs: nf_tables and one per family."""
    return ["CONFIG_NF_TABLES", *(FAMILY_OPTIONS[f] for f in sorted(families(text)))]


def file_line(text_line: int, key_line: int | None, value: Any) -> int | None:
    """The lab file's line of line ``text_line`` of a ruleset written at ``key_line``.

    A block scalar (``nftables: |``) starts on the line after its key; a
    one-line string is on the key's line.  A list's items are located by the
    caller (one key path per item).
    """
    if key_line is None:
        return None
    if isinstance(value, str) and "\n" in value.rstrip("\n"):
        return key_line + text_line
    return key_line
