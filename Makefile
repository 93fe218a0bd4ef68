.PHONY: run test setup lint bench faults fleet deploy-test fresh-test

run:    ## worker + beat + Flower in the foreground (installs what is missing first)
	scripts/run.sh

test:   ## the whole test suite, unit and integration (installs and starts services first)
	scripts/test.sh

setup:  ## install Debian packages and .venv, start redis-server and libvirtd
	scripts/setup.sh

deploy-test:  ## build the images, run docker-compose.yml for real against this host's libvirtd, check it
	scripts/deploy-test.sh

fresh-test:  ## the README's two commands in a bare debian:bookworm-slim container (only make and git added)
	scripts/fresh-test.sh

lint:   ## ruff and mypy (configured in pyproject.toml), as CI runs them
	scripts/setup.sh --no-services
	.venv/bin/ruff check .
	.venv/bin/mypy

bench:  ## the benchmarks (see bench/README.md); record results in bench/RESULTS.md
	scripts/setup.sh --with-rabbitmq
	.venv/bin/python -m bench.transitions -P threads -c 8
	.venv/bin/python -m bench.brokers -P threads -c 8
	.venv/bin/python -m bench.bulk_suspend
	.venv/bin/python -m bench.plan_fleet

faults:  ## the fault suite on real parts, on both brokers (bench/faults.py, table in bench/RESULTS.md); FAULTS_QUICK=1: the reduced CI version
	scripts/setup.sh --with-rabbitmq
	FAULTS_QUICK=$(FAULTS_QUICK) .venv/bin/python -m bench.faults

fleet:  ## a fleet on one Redis: 1, 10 and 50 hosts x 1,000 guests, one night each (bench/fleet.py, ~45 min); FLEET_QUICK=1: the reduced CI version
	scripts/setup.sh
	FLEET_QUICK=$(FLEET_QUICK) .venv/bin/python -m bench.fleet
