"""``python -m ckptd``: the same as the ``ckptd`` console script."""

from ckptd.cli.main import main

main()
