"""``dormant reclaim|restore|drain|exempt|unexempt|idle|sample`` (to be written)."""
