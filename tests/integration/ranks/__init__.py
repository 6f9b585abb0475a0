"""Multi-rank jobs end to end: ``torchrun`` with DDP over two daemons, ranks and daemons
SIGKILLed around a step's hand-off, and :mod:`~tests.integration.ranks.scan`, the check that no
global record is ever visible without all its parts."""
