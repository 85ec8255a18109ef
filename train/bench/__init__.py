"""Benchmarks (scripts/bench_*.py): the memory layer (`memory`), the models (`model`), the kernels
on a GPU (`kernels`, `attention`) and the comparison of training runs (`runs`); `common` holds
what they share. Each case runs in a child process (`python -m titans.train.bench.<name> --child`)."""
