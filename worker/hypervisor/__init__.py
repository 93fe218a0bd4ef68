"""The hypervisor side: the only subpackage that imports libvirt."""
