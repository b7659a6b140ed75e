"""What the engine has done so far: the counters behind the status line, the watchdog's
progress check and the stop log."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineStats:
    polled_orders: int = 0  # orders read from listings (intake)
    delivered: int = 0  # lines delivered or confirmed delivered (delivery)
    parked: int = 0  # lines set aside for the merchant (delivery)
    retries: int = 0  # deliveries deferred to a later attempt (delivery)
    handled: int = 0  # lines a worker finished with, whatever the outcome (work queue)
    last_progress: float = 0.0  # when a line was last delivered (the ledger's clock)
