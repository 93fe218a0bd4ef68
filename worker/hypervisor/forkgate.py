"""Keep ``fork()`` from happening while this process is inside libvirt.

libvirt is not fork-safe: a child forked while another thread of the parent is inside a
libvirt call inherits that call's mutexes locked, and its own first call on the same driver
waits for ever (measured: 6 of 500 forks with the test driver busy in two threads). A Celery
prefork worker forks pool children at start and whenever it replaces one, while its main
process publishes the registry and reconciles on threads of its own.

So every libvirt call passes the gate (:func:`calling`), and ``os.register_at_fork`` closes
it before a fork: new calls wait, the fork waits (at most :data:`FORK_WAIT` seconds) for the
calls already inside libvirt, and both sides open it again afterwards. A call that is stuck
in a hung libvirtd is not waited for beyond that bound: a remote call waiting for its reply
holds no lock a child would need.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("dormant.hypervisor")

FORK_WAIT = 5.0  # seconds a fork waits for calls already inside libvirt


class ForkGate:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self._forking = False

    @contextmanager
    def calling(self) -> Iterator[None]:
        """Around one libvirt call: waits while a fork is under way."""
        with self._cond:
            self._cond.wait_for(lambda: not self._forking)
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    def before_fork(self) -> None:
        with self._cond:
            self._forking = True
            if not self._cond.wait_for(lambda: self._inside == 0, timeout=FORK_WAIT):
                log.warning("forking while %d libvirt call(s) are still running after %gs",
                            self._inside, FORK_WAIT)

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        # The parent's threads do not exist here: nothing is inside libvirt, and the lock
        # may have been copied in any state, so start afresh.
        self.__init__()  # type: ignore[misc]


gate = ForkGate()
os.register_at_fork(before=gate.before_fork, after_in_parent=gate.after_fork_in_parent,
                    after_in_child=gate.after_fork_in_child)
