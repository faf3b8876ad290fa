"""Native (C++) kernels called from XLA as FFI custom calls."""
