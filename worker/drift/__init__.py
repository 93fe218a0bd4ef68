"""Changes made behind dormant's back: libvirt lifecycle events and reconciliation."""
