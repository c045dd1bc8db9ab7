"""What every process of a run stands on: process groups and collectives, user errors and
their one-line reports, faults (heartbeat, watchdog marks, exit codes) and memory readings."""
