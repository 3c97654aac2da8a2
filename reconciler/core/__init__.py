"""The pure core: the desired state and its validation, the port shuffle, rendering, diffing,
inventories and the audit trail's meaning. Data in, data out: no root, no I/O, no clock."""
