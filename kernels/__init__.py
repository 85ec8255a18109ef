"""`titans.kernels`: the compute kernels. Each op (`memory`, `attention`) has a plain reference, an
XLA fast path and Pallas kernels behind one `impl=` switch; it imports nothing of the model."""
