"""mtd: hides a host's services from untrusted sources on shifting ports with nftables.

`core/` takes data and returns data (it reads only files that ship with mtd or that the user
names as templates: the schema, and template sources through Jinja2's loader); `adapters/`
are the only modules that touch the kernel, Redis, git or the host's files; `services/`
combine them; `cli/` is the command line (see docs/development.md).
"""

__version__ = "0.1.0"
