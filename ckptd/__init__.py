"""ckptd: the checkpoint daemon, the on-disk store format and the operators' CLI.

The training-side library is :mod:`ckptd_client`. The daemon never imports it; only ``ckptd bench``
(:mod:`ckptd.cli.bench`) does, lazily, to measure the client's path through a daemon.
"""

__version__ = "0.1.0"
