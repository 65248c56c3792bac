/* Copy bytes and compute their CRC-32C in the same pass (feddiff.compress._copycrc).
 *
 * The wire frames' two costs are a copy (tensors into the frame, the frame out to tensors) and the
 * CRC-32C of the same bytes. Done apart, the bytes are read from memory twice; here once: each 32 bytes
 * are loaded and stored, and their four 8-byte words (read back from L1) are fed to the CPU's CRC-32C
 * instruction (SSE4.2), on three interleaved lanes so that the instruction's latency is hidden (the
 * lanes' CRCs are joined with the zero-shift operator, as zlib's crc32_combine does). The results equal the `crc32c` package's: crc32c(data, value).
 *
 * x86-64 with SSE4.2 and AVX2 only (checked at import: `hardware`); elsewhere the module imports with
 * hardware = 0 and feddiff uses the separate copy and the `crc32c` package. Built by setup.py as an
 * optional extension: without a C compiler feddiff installs and works without it.
 *
 *     copy(dst, src, crc=0) -> int        dst (writable) and src: buffers of one length
 *     gather(dst, offset, pieces, crc=0)  pieces: (address, size) of memory the caller keeps alive,
 *                                         written one after another into dst from offset
 * The CRC is of the bytes as written to dst. The memory written must not overlap the memory read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define COPYCRC_X86 1
#else
#define COPYCRC_X86 0
#endif

#define LANE 2048 /* bytes per lane; three lanes run side by side (measured: 2-8 KiB are alike) */

static int hardware = 0;

#if COPYCRC_X86
static uint32_t lane_shift[32]; /* the CRC register after LANE zero bytes, from each single bit */

__attribute__((target("sse4.2"))) static uint32_t crc_words(uint32_t crc, const unsigned char *s, size_t n) {
    uint64_t c = crc;
    for (; n >= 8; n -= 8, s += 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        c = _mm_crc32_u64(c, w);
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = _mm_crc32_u8(c32, *s++);
    return c32;
}

__attribute__((target("sse4.2"))) static uint32_t copy_words(uint32_t crc, unsigned char *d, const unsigned char *s,
                                                             size_t n) {
    uint64_t c = crc;
    for (; n >= 8; n -= 8, s += 8, d += 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        memcpy(d, &w, 8);
        c = _mm_crc32_u64(c, w);
    }
    uint32_t c32 = (uint32_t)c;
    for (; n; n--) {
        unsigned char b = *s++;
        *d++ = b;
        c32 = _mm_crc32_u8(c32, b);
    }
    return c32;
}

static uint32_t shift_lane(uint32_t x) {
    uint32_t out = 0;
    for (int i = 0; i < 32; i++) out ^= lane_shift[i] & (0u - ((x >> i) & 1u));
    return out;
}

/* The CRC register (not inverted) continued over n bytes of s, copied to d on the way. */
__attribute__((target("sse4.2,avx2"))) static uint32_t copy_crc(uint32_t crc, unsigned char *d,
                                                                const unsigned char *s, size_t n) {
    for (; n >= 3 * LANE; n -= 3 * LANE, s += 3 * LANE, d += 3 * LANE) {
        uint64_t a = crc, b = 0, c = 0;
        const unsigned char *s0 = s, *s1 = s + LANE, *s2 = s + 2 * LANE;
        unsigned char *d0 = d, *d1 = d + LANE, *d2 = d + 2 * LANE;
        for (size_t i = 0; i < LANE; i += 32) {
            /* one 32-byte store per lane (8-byte stores were 20% slower), then four CRC steps over what was
             * stored, read back from L1: the checksum is of the bytes written, even if the source changes
             * meanwhile (another thread writing a tensor being sent) */
            _mm256_storeu_si256((__m256i *)(d0 + i), _mm256_loadu_si256((const __m256i *)(s0 + i)));
            _mm256_storeu_si256((__m256i *)(d1 + i), _mm256_loadu_si256((const __m256i *)(s1 + i)));
            _mm256_storeu_si256((__m256i *)(d2 + i), _mm256_loadu_si256((const __m256i *)(s2 + i)));
            for (int k = 0; k < 32; k += 8) {
                uint64_t w0, w1, w2;
                memcpy(&w0, d0 + i + k, 8);
                memcpy(&w1, d1 + i + k, 8);
                memcpy(&w2, d2 + i + k, 8);
                a = _mm_crc32_u64(a, w0);
                b = _mm_crc32_u64(b, w1);
                c = _mm_crc32_u64(c, w2);
            }
        }
        crc = shift_lane(shift_lane((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
    }
    return copy_words(crc, d, s, n);
}

static void make_lane_shift(void) {
    static const unsigned char zeros[LANE];
    for (int i = 0; i < 32; i++) lane_shift[i] = crc_words(1u << i, zeros, LANE);
}
#endif

/* crc: a Python int of 32 bits (the CRC so far), else OverflowError. */
static int crc_arg(PyObject *obj, void *out) {
    unsigned long value = PyLong_AsUnsignedLong(obj);
    if (value == (unsigned long)-1 && PyErr_Occurred()) return 0;
    if (value > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "crc must be a 32-bit unsigned value");
        return 0;
    }
    *(uint32_t *)out = (uint32_t)value;
    return 1;
}

static PyObject *not_here(void) {
    PyErr_SetString(PyExc_RuntimeError, "_copycrc: this CPU lacks SSE4.2/AVX2 (check `hardware` first)");
    return NULL;
}

static PyObject *copy(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer dst, src;
    uint32_t value = 0;
    if (!hardware) return not_here();
    if (!PyArg_ParseTuple(args, "w*y*|O&:copy", &dst, &src, crc_arg, &value)) return NULL;
    if (dst.len != src.len) {
        PyErr_Format(PyExc_ValueError, "copy: dst has %zd bytes, src %zd; they must be equal", dst.len, src.len);
        PyBuffer_Release(&dst);
        PyBuffer_Release(&src);
        return NULL;
    }
    uint32_t crc = ~value;
#if COPYCRC_X86
    Py_BEGIN_ALLOW_THREADS
    crc = copy_crc(crc, (unsigned char *)dst.buf, (const unsigned char *)src.buf, (size_t)src.len);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return PyLong_FromUnsignedLong(~crc);
}

static PyObject *gather(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer dst;
    PyObject *pieces, *fast = NULL, *result = NULL;
    Py_ssize_t offset, count, total = 0;
    uint32_t value = 0;
    uintptr_t *address = NULL;
    size_t *size = NULL;
    if (!hardware) return not_here();
    if (!PyArg_ParseTuple(args, "w*nO|O&:gather", &dst, &offset, &pieces, crc_arg, &value)) return NULL;
    if (offset < 0 || offset > dst.len) {
        PyErr_Format(PyExc_ValueError, "gather: offset %zd is outside dst's %zd bytes", offset, dst.len);
        goto done;
    }
    if (!(fast = PySequence_Fast(pieces, "gather: pieces must be a sequence of (address, size)"))) goto done;
    count = PySequence_Fast_GET_SIZE(fast);
    address = PyMem_Malloc(sizeof(*address) * (size_t)(count ? count : 1));
    size = PyMem_Malloc(sizeof(*size) * (size_t)(count ? count : 1));
    if (!address || !size) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_Format(PyExc_TypeError, "gather: piece %zd is not an (address, size) tuple", i);
            goto done;
        }
        address[i] = (uintptr_t)PyLong_AsVoidPtr(PyTuple_GET_ITEM(item, 0));
        if (PyErr_Occurred()) goto done;
        Py_ssize_t n = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
        if (PyErr_Occurred()) goto done;
        if (n < 0 || (n && !address[i])) {
            PyErr_Format(PyExc_ValueError, "gather: piece %zd has size %zd at address %p", i, n, (void *)address[i]);
            goto done;
        }
        if (n > dst.len - offset - total) { /* (checked before adding: a sum of sizes must not wrap around) */
            PyErr_Format(PyExc_ValueError, "gather: the pieces from offset %zd do not fit in %zd (piece %zd: %zd bytes "
                         "after %zd)", offset, dst.len, i, n, total);
            goto done;
        }
        size[i] = (size_t)n;
        total += n;
    }
    {
        uint32_t crc = ~value;
        unsigned char *d = (unsigned char *)dst.buf + offset;
#if COPYCRC_X86
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < count; i++) {
            crc = copy_crc(crc, d, (const unsigned char *)address[i], size[i]);
            d += size[i];
        }
        Py_END_ALLOW_THREADS
#endif
        result = PyLong_FromUnsignedLong(~crc);
    }
done:
    PyMem_Free(address);
    PyMem_Free(size);
    Py_XDECREF(fast);
    PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef methods[] = {
    {"copy", copy, METH_VARARGS, "copy(dst, src, crc=0) -> the CRC-32C of src continued from crc; src copied to dst"},
    {"gather", gather, METH_VARARGS,
     "gather(dst, offset, pieces, crc=0) -> the CRC-32C of the pieces continued from crc; each piece "
     "(address, size) written after the previous one into dst from offset"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_copycrc",
                                    "A copy and its CRC-32C in one pass (x86-64: SSE4.2 + AVX2).", -1, methods};

PyMODINIT_FUNC PyInit__copycrc(void) {
#if COPYCRC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("avx2")) {
        make_lane_shift();
        hardware = 1;
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "hardware", hardware) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
