"""The ``ckptd`` command line: operator commands over the store and the daemon."""
