"""A namespace's bridge ports as the kernel holds them: their VLANs, the static fdb, the learnt MACs.

The bridge half of :class:`labctl.kernel.links.NodeLinks` (a mixin on its
netlink handle): status shows these and converge compares them with the
lab file, one raw AF_BRIDGE dump each.
"""

from __future__ import annotations

import struct
from typing import Any

from labctl.kernel.netlink import (
    _IFINFO,
    _NLA,
    IFLA_AF_SPEC,
    IFLA_IFNAME,
    RTM_GETLINK,
    _attrs,
    _cstr,
    _mac,
    _u32,
)
from labctl.kernel.nodenetlink import NodeNetlink


def decode_vlan_infos(af_spec: bytes, vlan_info_type: int = 2) -> dict[int, str]:
    """vid -> "pvid untagged" / "untagged" / "tagged" from an AF_BRIDGE IFLA_AF_SPEC payload (repeated attributes)."""
    PVID, UNTAGGED = 0x2, 0x4
    vlans: dict[int, str] = {}
    offset = 0
    while offset + 4 <= len(af_spec):
        length, kind = _NLA.unpack_from(af_spec, offset)
        if length < 4:
            break
        if kind & 0x3FFF == vlan_info_type and length >= 8:
            flags, vid = struct.unpack_from("=HH", af_spec, offset + 4)
            words = [word for word, bit in (("pvid", PVID), ("untagged", UNTAGGED)) if flags & bit]
            vlans[vid] = " ".join(words) or "tagged"
        offset += (length + 3) & ~3
    return vlans


class NodeBridgePorts(NodeNetlink):
    """Bridge port VLANs and fdb entries of one namespace, over its :class:`NodeNetlink`."""

    def port_vlans(self) -> dict[str, dict[int, str]]:
        """Each bridge port's VLANs: name -> vid -> "pvid untagged" / "untagged" / "tagged" (one raw dump).

        An AF_BRIDGE link dump asked for RTEXT_FILTER_BRVLAN lists, per port,
        one IFLA_BRIDGE_VLAN_INFO (struct bridge_vlan_info: flags, vid) per
        VLAN; a kernel without VLAN filtering lists none.
        """
        AF_BRIDGE, IFLA_EXT_MASK, RTEXT_FILTER_BRVLAN, IFLA_BRIDGE_VLAN_INFO = 7, 29, 2, 2
        self.commit()
        found: dict[str, dict[int, str]] = {}
        body = _IFINFO.pack(AF_BRIDGE, 0, 0, 0, 0) + _u32(IFLA_EXT_MASK, RTEXT_FILTER_BRVLAN)
        for _, data, offset in self.nl.dump(RTM_GETLINK, body):
            attrs = _attrs(data, offset + _IFINFO.size, frozenset({IFLA_IFNAME, IFLA_AF_SPEC}))
            if IFLA_IFNAME not in attrs or IFLA_AF_SPEC not in attrs:
                continue
            vlans = decode_vlan_infos(attrs[IFLA_AF_SPEC], IFLA_BRIDGE_VLAN_INFO)
            if vlans:
                found[_cstr(attrs[IFLA_IFNAME])] = vlans
        return found

    def static_fdb(self) -> list[dict[str, Any]]:
        """Static fdb entries of every bridge here (``bridge fdb add ... static [sticky]``), one raw dump.

        Learnt entries and the bridges' own permanent ones are left out: these
        are the entries a lab file asked for.
        """
        RTM_GETNEIGH, NDA_LLADDR, NDA_VLAN, NDA_MASTER = 30, 2, 5, 9
        NUD_NOARP, NUD_PERMANENT, NTF_STICKY, AF_BRIDGE = 0x40, 0x80, 0x40, 7
        self.commit()
        names = {index: name for name, index in self.index.items()}
        found = []
        for _, data, offset in self.nl.dump(RTM_GETNEIGH, struct.pack("=BxxxiHBB", AF_BRIDGE, 0, 0, 0, 0)):
            _, ifindex, state, flags, _ = struct.unpack_from("=BxxxiHBB", data, offset)
            if not state & NUD_NOARP or state & NUD_PERMANENT:
                continue
            attrs = _attrs(data, offset + 12)
            if NDA_MASTER not in attrs or NDA_LLADDR not in attrs:
                continue
            master = struct.unpack("=I", attrs[NDA_MASTER][:4])[0]
            found.append(
                {
                    "bridge": names.get(master, str(master)),
                    "mac": _mac(attrs[NDA_LLADDR]),
                    "port": names.get(ifindex, str(ifindex)),
                    "vlan": struct.unpack("=H", attrs[NDA_VLAN][:2])[0] if NDA_VLAN in attrs else None,
                    "sticky": bool(flags & NTF_STICKY),
                }
            )
        return found

    def learnt_macs(self, bridge: str) -> list[str]:
        """MACs the bridge learnt on its ports (the fdb minus permanent local entries)."""
        NUD_PERMANENT = 0x80
        found = []
        for msg in self.ipr.get_neighbours(family=7, master=self.index[bridge]):  # AF_BRIDGE
            if msg["state"] & NUD_PERMANENT:
                continue
            mac = msg.get("lladdr")
            if mac and mac not in found:
                found.append(mac)
        return found
