"""What combines the core with the adapters: one reconcile pass (`reconcile`), the `mtd run`
loop (`daemon`) and a GitOps pull round (`gitops`). Each takes its kernel backend as a
parameter, so its logic runs against the in-memory fake as well as the real kernel."""
