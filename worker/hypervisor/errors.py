"""libvirt's errors, translated once, by error code and domain, into dormant's error tree.

Never by message text: messages change between libvirt versions and languages.
"""

from __future__ import annotations

import logging
from typing import Any

import libvirt

from worker.core.errors import (
    HypervisorBusy,
    HypervisorRefused,
    HypervisorUnavailable,
    InvalidTransition,
    UnknownInstance,
)

log = logging.getLogger("dormant.hypervisor")

# Error codes that mean the connection to libvirtd is gone or never came up.
_CONNECTION_CODES = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
}
# Codes that mean "connection lost" only when raised by the remote/RPC layer.
_REMOTE_CODES = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR}
_REMOTE_DOMAINS = {libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC}
# Codes that usually pass: the domain's state-change lock, an agent or a job in progress.
_BUSY_CODES = {
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
}
_MISSING_CODES = {libvirt.VIR_ERR_NO_DOMAIN}
_INVALID_CODES = {libvirt.VIR_ERR_OPERATION_INVALID}


def _quiet_error_handler(_ctx: object, err: tuple[Any, ...]) -> None:
    """Keep libvirt from printing every error to stderr; errors still raise as exceptions."""
    log.debug("libvirt: %s", err[2] if len(err) > 2 else err)


libvirt.registerErrorHandler(_quiet_error_handler, None)


def translate(exc: libvirt.libvirtError, what: str) -> Exception:
    """Map a libvirtError to dormant's tree by code and domain, never by message text."""
    code, domain = exc.get_error_code(), exc.get_error_domain()
    detail = f"{what}: {exc.get_error_message()} (libvirt error {code})"
    if code in _CONNECTION_CODES or (code in _REMOTE_CODES and domain in _REMOTE_DOMAINS):
        return HypervisorUnavailable(f"hypervisor unavailable: {detail}")
    if code in _BUSY_CODES:
        return HypervisorBusy(detail)
    if code in _MISSING_CODES:
        return UnknownInstance(detail)
    if code in _INVALID_CODES:
        return InvalidTransition(detail)
    return HypervisorRefused(detail)
