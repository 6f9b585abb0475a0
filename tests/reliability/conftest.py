"""The reliability suite: kill loops, fault injection, corruption, fuzzing, access and load.

Nothing is registered here. Every module marks its tests with ``pytestmark``
(``pytest.mark.reliability``); the marker itself is declared in ``pyproject.toml``. Helpers and
fixtures live in :mod:`tests.reliability.fixtures`, trainer processes in
:mod:`tests.reliability.trainers`.

Tests that need libfiu (``fiu-utils``) or a tmpfs at ``/dev/shm`` skip without them, and fail
under ``CI=true`` (:mod:`tests._requirements`).

Each loop runs for a CI default (the whole directory stays under four minutes on two cores); set
``CKPTD_RELIABILITY_SECONDS=N`` to run every loop for N seconds instead. Run with ``-s`` to see
the one-line summary each loop prints.
"""
