# Benchmarks package marker: lets tests and scripts import the harness as `benchmarks.common`.
