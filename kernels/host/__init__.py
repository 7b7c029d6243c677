"""longkd.kernels.host: the CUDA kernel run on the CPU for tests (g++ build, CuPy stand-in)."""
