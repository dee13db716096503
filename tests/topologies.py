"""Lab topologies several test files use (the notes' VM topology, in its smallest form)."""

VMS = """\
topology:
  nodes:
    host:
      bridges:
        br0: {ports: [tap1, tap2]}
      interfaces:
        br0: {addresses: [192.168.3.101/24]}
    vm1:
      kind: vm
      interfaces:
        eth0: {addresses: [192.168.3.102/24]}
    vm2:
      kind: vm
      interfaces:
        eth0: {addresses: [192.168.3.103/24]}
  links:
    - endpoints: ["vm1:eth0", "host:tap1"]
    - endpoints: ["vm2:eth0", "host:tap2"]
"""
