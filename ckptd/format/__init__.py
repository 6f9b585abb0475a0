"""The on-disk format and its reader: content-addressed objects, manifests, the commit, restore.

Nothing here knows about sockets, daemons or policy; a store written by the daemon can be read
with this package alone (``docs/format.md``).
"""
