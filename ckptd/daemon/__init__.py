"""The ckptd daemon: the service that writes to disk what trainers hand over.

``lifecycle``  startup -> serve -> drain; the Daemon that builds and wires the parts
``session``    one client's connection: messages, replies, slots, submit
``admission``  what is accepted, from whom: peers, slots, snapshots (with the disk guard)
``writer``     the FIFO write queue and the single writer: the pipeline, then committed / failed
``stores``     the stores and jobs the daemon writes to
``requests``   what the queue carries: :class:`Slot`, :class:`WriteRequest`
``listen``     the listening socket and peer credentials
``stats`` ``metrics`` ``systemd``   ``ckptd status`` counters, Prometheus, sd_notify

Each module imports only those listed below it (``lifecycle`` at the top; ``stats``, ``metrics``,
``systemd`` and ``listen`` at the bottom); none imports ``lifecycle``.
"""
