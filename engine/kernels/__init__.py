"""The engine's own CPU kernels: C sources compiled on first use and loaded with ctypes (see build.py)."""
