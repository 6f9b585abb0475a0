"""ckptd: the checkpoint daemon, the on-disk store format and the operators' CLI.

The training-side library is :mod:`ckptd_client`, which may use ckptd's format, protocol and
config; ckptd never imports it (``ckptd bench`` runs it as a separate trainer process). The parts
and which may use which: ``docs/architecture.md``; ``lint-imports`` checks them.
"""

__version__ = "0.1.0"
