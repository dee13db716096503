"""One namespace's rtnetlink handle: its socket, its batch of changes and its interface index cache.

The base of :class:`labctl.kernel.links.NodeLinks` and of the mixins that
make it up (addresses, routes, bridge ports, offloads): each adds requests
through :meth:`NodeNetlink._send` and reads through :meth:`NodeNetlink.commit`
first, so a read always sees the changes queued before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from labctl.kernel import netns
from labctl.kernel.linkinfo import LINK_DUMP
from labctl.kernel.netlink import _IFINFO, IFLA_IFNAME, RTM_GETLINK, Netlink, _attrs, _cstr, _kernel_error

if TYPE_CHECKING:
    from pyroute2 import IPRoute

_NAME_ONLY = frozenset({IFLA_IFNAME})


class NodeNetlink:
    """Netlink access to one namespace; create it once per node and reuse it.

    With ``batch=True`` changes wait in a queue until :meth:`commit` (a read
    commits first, so it always sees them); otherwise each change is sent and
    acknowledged at once.
    """

    def __init__(self, namespace: str, nl: Netlink | None = None, batch: bool = False) -> None:
        self.namespace = namespace
        if nl is None:
            with netns.entered(namespace):
                nl = Netlink()
        self.nl = nl
        self.batch = batch
        self.index: dict[str, int] = {}
        self._ipr: IPRoute | None = None

    @property
    def ipr(self) -> IPRoute:
        """A pyroute2 socket in the same namespace, for what this module does not encode itself."""
        if self._ipr is None:
            self._ipr = netns.netlink(self.namespace)
        return self._ipr

    def close(self) -> None:
        self.nl.close()
        if self._ipr is not None:
            self._ipr.close()

    def _send(self, what: str, kind: int, flags: int, body: bytes, fd: int | None = None) -> None:
        self.nl.queue(what, kind, flags, body, fd)
        if not self.batch:
            self.commit()

    def commit(self) -> None:
        """Send every queued change; the first refusal is raised, naming its object."""
        failed = self.nl.commit()
        if failed:
            what, code = failed[0]
            raise _kernel_error(what, self.namespace, code)

    # -- the index cache -------------------------------------------------
    def _dump_links(self, wanted: frozenset[int] | None = None) -> Iterator[tuple[int, dict[int, bytes], int]]:
        self.commit()
        for data in self.nl.dump_all(RTM_GETLINK, LINK_DUMP):
            _, _, index, flags, _ = _IFINFO.unpack_from(data, 16)
            yield index, _attrs(data, 16 + _IFINFO.size, wanted), flags

    def refresh(self, names: set[str] | None = None) -> dict[str, int]:
        """Learn interface indexes; one dump serves any ``names`` (cheaper than a request per name)."""
        self.index = {_cstr(attrs[IFLA_IFNAME]): index for index, attrs, _ in self._dump_links(_NAME_ONLY)}
        return self.index

    def ensure_indexes(self, names: set[str]) -> None:
        """Learn the indexes of ``names`` that are not known yet (addresses and qdiscs need them)."""
        if not names <= self.index.keys():
            self.refresh()
