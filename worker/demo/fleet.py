"""The demo fleet's names and UUIDs: plain data, shared by ``make run``'s real guests
(:mod:`worker.demo.bringup`) and the test driver's stand-ins (``worker.hypervisor.testdriver``),
without either importing the other.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass

PREFIX = "dormant-demo-"
_NAMESPACE = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://dormant.dev/demo")


def demo_uuid(name: str) -> str:
    """The same UUID for the same name on every run and every machine."""
    return str(uuidlib.uuid5(_NAMESPACE, name))


@dataclass(frozen=True)
class DemoGuest:
    name: str
    kind: str  # "busy" spins (never reclaimed), "idle" halts (reclaimed)
    role: str  # what the banner says about it

    @property
    def uuid(self) -> str:
        return demo_uuid(self.name)


# One busy guest only: it burns a whole core for as long as the demo runs.
FLEET = (
    DemoGuest(f"{PREFIX}web", "idle", "idle; the README's first snippet suspends it"),
    DemoGuest(f"{PREFIX}db", "idle", "idle; reclamation suspends it"),
    DemoGuest(f"{PREFIX}cache", "idle", "idle; reclamation suspends it"),
    DemoGuest(f"{PREFIX}batch", "busy", "spins at 100% CPU; reclamation keeps it"),
)
