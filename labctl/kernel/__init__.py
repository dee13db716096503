"""The kernel layer: netlink, namespaces, sysctl, netfilter, tracefs.

Nothing in here knows about YAML or lab files; it speaks in namespaces,
interface names and addresses.
"""
