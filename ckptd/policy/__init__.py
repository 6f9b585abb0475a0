"""What to keep and when to make room: retention, prune, the disk guard.

Policy decides; deleting goes through the store's own calls (``Store.delete_manifest``, ``gc``).
"""
