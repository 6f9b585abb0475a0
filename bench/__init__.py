"""Benchmarks of ckptd against plain zstd, zipnn, torch.save and safetensors (see README.md)."""
