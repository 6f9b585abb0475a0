"""The ckptd daemon: socket and sessions, lifecycle, the write queue, metrics, systemd."""
