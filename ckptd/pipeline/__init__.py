"""One checkpoint from tensor bytes to a committed manifest: plan chunks, hash, encode, write."""
