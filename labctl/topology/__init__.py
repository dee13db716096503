"""The topology model: what a lab is made of, independent of any kernel."""

from labctl.topology.loader import load_topology, parse_topology
from labctl.topology.model import Topology

__all__ = ["Topology", "load_topology", "parse_topology"]
