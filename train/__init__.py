"""`titans.train`: everything that runs a model beyond the forward pass. Training (`config`, `steps`,
`mesh`, `run_dir`, `trainer`, `data/`), evaluation and diagnostics (`eval/`), benchmarks (`bench/`)
and what the command lines in scripts/ share (`cli`). It imports the model (`titans`) and the
kernels (`titans.kernels`); they import nothing of it."""
