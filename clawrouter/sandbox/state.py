"""Everything one sandbox server remembers, and the few operations that change it.

One event loop serves all requests, and no method here awaits, so check-then-record steps
(replay, settle once) are atomic without locks.
"""

from __future__ import annotations

from typing import Any

from clawrouter.catalog import estimate_micro, to_micro
from clawrouter.sandbox import wire
from clawrouter.sandbox.chain import Chain
from clawrouter.sandbox.config import SandboxConfig
from clawrouter.sandbox.faults import Faults, Rule
from clawrouter.sandbox.jobs import Jobs
from clawrouter.sandbox.media import MediaStore
from clawrouter.sandbox.stats import Stats
from clawrouter.sandbox.validate import ImageRequest
from clawrouter.sandbox.verify import Verified, requirement

PRUNE_AT = 100_000  # used authorizations kept before expired ones are dropped


class UsedAuthorizations:
    """`(payer, nonce)` pairs already accepted, with the job each one created (if any).

    Entries past their validBefore can never verify again, so they are pruned when the set
    grows large; nothing still spendable is ever forgotten.
    """

    def __init__(self) -> None:
        self._used: dict[tuple[str, str], tuple[int, str | None]] = {}

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._used

    def job_of(self, key: tuple[str, str]) -> str | None:
        return self._used[key][1]

    def add(self, verified: Verified, now: int, job_id: str | None = None) -> None:
        if len(self._used) >= PRUNE_AT:
            self._used = {k: v for k, v in self._used.items() if v[0] >= now}
        self._used[verified.replay_key] = (verified.valid_before, job_id)

    def clear(self) -> None:
        self._used.clear()


class Sandbox:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.faults = Faults()
        self.jobs = Jobs()
        self.media = MediaStore()
        self.used = UsedAuthorizations()
        self.chain = Chain(config.chain, self.now, to_micro(config.faucet_usd),
                           lambda: self.config.finality_seconds)

    def reset(self) -> None:
        """Forget stats, jobs, faults, used authorizations and the chain (config and media
        stay)."""
        self.stats.reset()
        self.chain.clear()
        self.faults.clear()
        self.jobs.clear()
        self.used.clear()

    def now(self) -> float:
        return self.config.clock()

    def requirement(self, req: ImageRequest) -> dict[str, Any]:
        """What the sandbox really wants for this request (after standing price faults)."""
        amount = self.faults.price(req.route, req.model.id,
                                   estimate_micro(req.model, req.size, req.n))
        return requirement(self.config.chain, self.config.pay_to, amount,
                           self.config.max_timeout_seconds)

    def fire(self, kind: str, phase: str, req: ImageRequest) -> Rule | None:
        """Take one matching fault rule of `kind`, counting it in the stats."""
        rule = self.faults.take(kind, phase, req.route, req.model.id)
        if rule is not None:
            self.stats.faults_fired[kind] += 1
        return rule

    def settle(self, req: ImageRequest, payer: str, nonce: str, amount: int,
               job_id: str | None = None) -> str:
        """Record a settlement (on the stand-in chain, too); return its transaction hash."""
        transaction = wire.transaction_hash(payer, nonce)
        self.chain.transfer(payer, nonce, amount, transaction)
        event: dict[str, Any] = {"transaction": transaction, "amount": amount, "payer": payer,
                                 "nonce": nonce, "route": req.route, "model": req.model.id,
                                 "size": req.size, "n": req.n}
        if job_id:
            event["job_id"] = job_id
        self.stats.settle(event)
        return transaction
