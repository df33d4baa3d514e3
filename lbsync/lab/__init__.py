"""The lab: a firewall farm built from network namespaces on one machine, and its traffic tool.

- :mod:`lbsync.lab.farm` builds and tears down the farm (pyroute2: namespaces, links, addresses,
  routes; sysctls; the rendered datapath and a static bucket split) and reads node state back.
- :mod:`lbsync.lab.traffic` drives long-lived TCP connections and UDP flows through it and
  reports what survived, what changed and which node forwarded each flow.
- :mod:`lbsync.lab.cli` is ``lbsync lab up|status|exec|down|traffic``.
"""
