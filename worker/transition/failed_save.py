"""After libvirt failed a managed save: the guest as it was, and the error that says why.

Only for a save libvirt refused or failed (a permanent error): a transient one (a lost
connection, another job's lock) says nothing about the guest, and an abandoned call may
still be writing. libvirt resumes the guest after a failed save (``running(save_canceled)``)
but cannot promise it, and deletes a partial image only when it created the file. So the
worker checks: a guest that ran before runs again (unpaused if libvirt left it paused), and
an active guest keeps no image (:meth:`worker.hypervisor.Guest.settle_failed_save`). Then
the cause, which libvirt's error does not name by code (its I/O helper reports ENOSPC as a
plain "operation failed"):

* the save directory has no room for the guest now (someone filled it since the check) ->
  :class:`SaveDirectoryFull`, as if refused up front: a run stops starting saves;
* libvirt refused with "operation invalid" and the guest is still in the state that allowed
  the save -> :class:`Unsavable`: a device that cannot migrate (ivshmem, PCI passthrough,
  vGPU, virtiofs), refused however often it is asked;
* anything else: libvirt's own error.

What was done and seen goes into the error's details, and so into the journal entry.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from worker.core.errors import DormantError, InvalidTransition, Unsavable
from worker.core.states import Observed, State
from worker.hypervisor import Guest

if TYPE_CHECKING:
    from worker.transition.room import Room

log = logging.getLogger("dormant.transition")


def settle(exc: DormantError, guest: Guest, before: Observed, room: Room | None,
           action: str) -> DormantError:
    """Put ``guest`` back as it was ``before`` the failed save; the error to raise for it."""
    try:
        exc.details["settled"] = guest.settle_failed_save(
            was_running=before.state is State.RUNNING)
        after = guest.observe()
    except DormantError as settle_exc:
        exc.details["settle_error"] = str(settle_exc)
        log.error("%s: could not settle after a failed save: %s", guest.name, settle_exc)
        return exc
    exc.details["state_after"] = str(after)
    full = room.after_failed_save(guest, action) if room is not None else None
    if full is not None:
        full.details.update(exc.details, libvirt_error=str(exc))
        return full
    if isinstance(exc, InvalidTransition) and after.state is before.state:
        return Unsavable(f"libvirt cannot save {guest.name}: {exc}", **exc.details,
                         reason=str(exc))
    return exc
