"""One checkpoint from tensor bytes to a committed manifest: plan chunks, hash, encode, write.

Modules, bottom to top (each imports only those below it, and :mod:`ckptd.format`; the format
never imports the pipeline): ``plan`` (the tensors, the sizes, the chunks), ``digest`` (the
checkpoint digest from the chunks' copies), ``write`` (the chunk workers and the commit:
:func:`~ckptd.pipeline.write.write_checkpoint`) and, beside it, ``auto`` (the daemon's per-write
choice between compressing and raw for ``codec = "auto"``: :class:`~ckptd.pipeline.auto.AutoCodec`).
"""
