"""The chaos and soak harness: a whole station (main loop started through its
CLI, two producers at a configurable rate, the Tenta backend, a real
Mosquitto) under faults drawn from a seed, watched by an independent
subscriber that counts every producer message by its sequence number.

    python -m benchmarks.chaos [--seed N] [--duration S] [--rate R] [--faults a,b]

prints one JSON line per fault and the report at the end (see `report`);
exit code 1 when anything was lost. The test suite runs a short run
(`tests/test_chaos.py`); the README has the soak command."""
