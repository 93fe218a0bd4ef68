"""One transition of one guest: the table, the runner, its Redis guards and Lua scripts."""
