"""The LSRM transformer (Engine A): tokenisers, dense and sparse stages, NSA attention and routing."""
