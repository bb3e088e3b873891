# Implementations of the perceiver resampler: reference (the seed's math) and fast.
