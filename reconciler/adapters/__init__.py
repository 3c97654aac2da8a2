"""The imperative shell's edges: the only modules that talk to libnftables (`kernel`), Redis
(`bus`), git (`git`), the host's files and locks (`files`) and the audit log (`auditlog`)."""
