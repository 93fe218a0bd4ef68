"""The hypervisor side: the only subpackage that imports libvirt.

``host`` (connections to one URI), ``guest`` (one domain, one method per meaning), ``calls``
(every call on its connection's thread, within a deadline), ``errors`` (libvirt's errors
translated by code), ``domain_stats`` (activity for reclamation), ``events`` (lifecycle
events for the drift pump), ``forkgate`` (no fork while inside libvirt), ``testdriver`` (the
demo fallback). Callers import what they need from here.
"""

from worker.hypervisor.calls import calls_in_flight, oldest_calls
from worker.hypervisor.domain_stats import DomainStats
from worker.hypervisor.errors import translate
from worker.hypervisor.guest import Guest
from worker.hypervisor.host import Hypervisor, connected, shared

__all__ = ["DomainStats", "Guest", "Hypervisor", "calls_in_flight", "connected", "oldest_calls",
           "shared", "translate"]
