"""Files deploy/ writes onto devices and servers (scripts, systemd units)."""
