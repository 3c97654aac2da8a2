"""mtd: hides a host's services from untrusted sources on shifting ports with nftables.

`core/` takes data and returns data; `adapters/` are the only modules that touch the kernel,
Redis, git or disk; `services/` combine them; `cli/` is the command line (see README).
"""

__version__ = "0.1.0"
