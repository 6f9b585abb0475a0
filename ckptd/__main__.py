"""``python -m ckptd``: the same as the ``ckptd`` console script."""

from ckptd.cli import main

main()
