"""The pure core: the desired state and its validation, the port shuffle, rendering, diffing,
inventories and the audit trail's meaning. Data in, data out: no root, no clock, no network,
no writes; the only files read are the packaged schema and template sources (Jinja2's loader,
and its bytecode cache when the caller configured one)."""
