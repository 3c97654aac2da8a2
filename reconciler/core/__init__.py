"""The pure core: the desired state and its validation, the port shuffle, rendering, diffing,
inventories and the audit trail's meaning. Data in, data out: no root, no clock (callers give
`now`), no network, no writes through a path (tests/test_layout.py checks both); the only
files read are the packaged schema and template sources (Jinja2's loader). Rendered texts,
compiled templates, parsed states and schema verdicts are kept only through cache objects
the caller hands in (`caches`): no process global."""
