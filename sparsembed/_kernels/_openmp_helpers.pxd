# The only place OpenMP names come from, so that every kernel builds and runs
# (serially) when the compiler has no OpenMP (scikit-learn's pattern).
cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define SPARSEMBED_OPENMP_ENABLED 1
    #else
        #define SPARSEMBED_OPENMP_ENABLED 0
        #define omp_get_max_threads() 1
        #define omp_get_thread_num() 0
    #endif
    """
    bint SPARSEMBED_OPENMP_ENABLED
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
