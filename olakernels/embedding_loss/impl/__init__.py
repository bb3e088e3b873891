# Implementations of embedding_distill_loss: reference (oracle), torch (chunked), triton.
