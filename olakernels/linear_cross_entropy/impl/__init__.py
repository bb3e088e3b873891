# Implementations of linear_cross_entropy: reference (oracle), torch (chunked), triton.
