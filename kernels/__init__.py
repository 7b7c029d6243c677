"""longkd.kernels: the sparse-KL distillation loss (torch reference, CuPy CUDA kernel, autograd glue)."""
