"""Ferry as a service: the runtime, its control socket, metrics and systemd glue."""
