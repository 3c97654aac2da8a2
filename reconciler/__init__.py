"""mtd: hides a host's services from untrusted sources on shifting ports with nftables.

The pure core (state, shuffle, render, diff) takes data and returns data; the shell modules
(nft, bus, gitrepo, localfiles) are the only ones that touch the kernel, Redis, git or disk.
"""

__version__ = "0.1.0"
