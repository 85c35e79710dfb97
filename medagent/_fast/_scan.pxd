# Shared scanning primitive of the Cython kernels (inline, so each kernel compiles its own copy).
from libc.string cimport memchr


cdef inline Py_ssize_t find_byte(const unsigned char* buf, Py_ssize_t start, Py_ssize_t stop,
                                 unsigned char byte) noexcept nogil:
    """Index of `byte` in buf[start:stop], or -1: the memchr twin of bytes.find."""
    cdef const void* hit
    if start >= stop:
        return -1
    hit = memchr(buf + start, byte, <size_t>(stop - start))
    if hit == NULL:
        return -1
    return <Py_ssize_t>(<const unsigned char*>hit - buf)
