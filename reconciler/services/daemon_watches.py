"""How the daemon takes dynamic watch changes: the fleet's (queued by the subscriber) go to
the store and then into dyn4/dyn6 in one small element transaction, never a table
replacement; CrowdSec's decisions go to the fleet first, or stay on this host while Redis is
away. Beside the daemon's loop (`services.daemon`), which calls these when they are due."""

from __future__ import annotations

import contextlib
import logging
import time

from reconciler.adapters import bus, files, watchstore
from reconciler.core import schedule, watch
from reconciler.errors import MtdError
from reconciler.logs import event
from reconciler.services import watching


class Watches:
    """The daemon's watch half (a mixin of `services.daemon.Daemon`, whose loop owns every
    attribute read here)."""

    def crowdsec_orders(self, orders: list[bus.WatchOrder]) -> None:
        """CrowdSec's decisions (from the follower's thread): to the fleet, as `mtd watch`
        does; on this host alone without Redis, or while it cannot take them."""
        config = self.bus_config
        if config is not None:
            try:
                _, problems = bus.publish_watches(config, orders)
            except MtdError as exc:
                problem = "; ".join(exc.problems)
                event(
                    self.log,
                    logging.WARNING,
                    "crowdsec",
                    f"{problem}: CrowdSec decisions applied on this host alone, published to "
                    "the fleet once Redis is back",
                    error=problem,
                )
                kept = [
                    {"op": o.op, "source": o.source, "reason": o.reason, "origin": o.origin,
                     "expires_at": o.expires_at if o.op == "add" else 0}
                    for o in orders
                ]  # fmt: skip
                with contextlib.suppress(MtdError):
                    watchstore.keep_unpublished(self.state.epoch_file, kept)
            else:
                for problem in problems:
                    event(self.log, logging.ERROR, "crowdsec", problem, error=problem)
                return
        for order in orders:
            self._queue.put(schedule.Watched(order, "crowdsec"))

    def _apply_watches(self) -> None:
        """Watch changes from the fleet: the store, then one small element transaction in
        dyn4/dyn6 (never a table replacement). For each source the last change wins."""
        orders, self._watches = self._watches, []
        last = {o.source: o for o in orders}
        nets = watching.trusted(self.state)
        now = time.time()
        add, remove, release = [], [], []
        for o in last.values():
            if o.op == "del" and o.origin == "crowdsec":  # never ends an operator's watch
                release.append((o.source, o.origin))
                continue
            if o.op == "del":
                remove.append(o.source)
                continue
            try:
                watch.canonical(o.source, nets)
            except MtdError as exc:
                self.metrics.watches.labels("rejected").inc()
                event(self.log, logging.WARNING, "rejected", f"watch add ignored: {exc}")
                continue
            if o.expires_at - now >= 1:
                add.append(watch.Entry(o.source, o.origin, o.reason, o.expires_at))
        if not add and not remove and not release:
            return
        try:
            with files.reconcile_lock(self.state.epoch_file), self._quiet():
                out = watching.change(self.state, self.nft, add, remove, now=now, release=release)
        except MtdError as exc:
            problem = "; ".join(exc.problems)
            event(
                self.log, logging.ERROR, "watch", f"watch change failed: {problem}", error=problem
            )
            return
        for problem in out.problems:
            event(self.log, logging.ERROR, "watch", problem, error=problem)
        self._count_watched()
        event(
            self.log,
            logging.INFO,
            "watch",
            out.line(self.state.table),
            added=[e.source for e in out.added],
            removed=out.removed,
            kernel=out.kernel,
        )

    def _count_watched(self) -> None:
        """`mtd_watched_sources{origin}` from the store (tripwire entries once harvested)."""
        try:
            entries = watchstore.load(watchstore.path_for(self.state.epoch_file))
        except MtdError:
            return
        for origin, n in watch.counts(entries, time.time()).items():
            self.metrics.watched.labels(origin).set(n)
