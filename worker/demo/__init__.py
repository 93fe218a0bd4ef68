"""``make run``'s demo fleet of tiny real guests."""
