"""lbsync: active-active conntrack replication for Linux firewall farms."""

__version__ = "0.1.0"
