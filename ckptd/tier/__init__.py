"""The object-store tier: committed checkpoints go to S3-compatible storage and come back.

:mod:`~ckptd.tier.remote` hides the S3 client behind :class:`~ckptd.tier.remote.Remote`;
:mod:`~ckptd.tier.keys` names what the bucket holds. The daemon uploads with
:mod:`~ckptd.tier.upload` and applies the tier's retention with :mod:`~ckptd.tier.prune`; readers
(the CLI, ``ckptd_client.load``) fetch with :mod:`~ckptd.tier.mirror`.
"""
