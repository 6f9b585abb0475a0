"""The on-disk format and its reader: content-addressed objects, manifests, the commit, restore.

Nothing here knows about sockets, daemons or policy; a store written by the daemon can be read
with this package alone (``docs/format.md``).

Layers, bottom to top; a module imports only modules below it:

1. ``ckptd.errors`` (outside the package).
2. ``hashing`` (object names), ``codec`` (object encoding), ``skeleton`` (non-tensor state as
   JSON), ``fsutil`` (durable writes, tmp files, directory fsyncs, locks).
3. ``manifest`` (the manifest file: its bytes, parsing, commit seq) and ``digest`` (the
   checkpoint digest).
4. The store's pieces: ``layout`` (the directory tree), then ``objects`` (object files: write,
   verify for reuse, make durable, quarantine, GC), ``commits`` (manifests: list, read, commit
   order, commit lock and commit) and ``jobmeta`` (pins and ``job.json``).
5. ``store`` (:class:`~ckptd.format.store.Store`, the façade the rest of ckptd calls).
6. ``restore`` (verified reads back to tensors and state), then ``export`` (to torch.save or
   safetensors files).
"""
