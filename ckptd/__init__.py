"""ckptd: the checkpoint daemon, the on-disk store format and the operators' CLI.

The training-side library is :mod:`ckptd_client`; this package never imports it.
"""

__version__ = "0.1.0"
