from libc.stdint cimport int32_t, int64_t

# Index arrays reach the kernels as int32 or int64; other integer dtypes are
# converted once at the Python boundary.
ctypedef fused index_t:
    int32_t
    int64_t
