"""``dormant status|pause|unpause|suspend|resume|ensure|history`` (to be written)."""
