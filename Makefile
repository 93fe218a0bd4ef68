.PHONY: run test setup lint bench

run:    ## worker + beat + Flower in the foreground (installs what is missing first)
	scripts/run.sh

test:   ## the whole test suite, unit and integration (installs and starts services first)
	scripts/test.sh

setup:  ## install Debian packages and .venv, start redis-server and libvirtd
	scripts/setup.sh

lint:
	.venv/bin/ruff check .
