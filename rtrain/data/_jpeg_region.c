/* Decode only a region of a JPEG with libjpeg-turbo: the rows above the region are entropy-decoded but
 * not transformed (jpeg_skip_scanlines), the columns outside it are neither inverse-transformed nor
 * colour-converted (jpeg_crop_scanline), and decoding stops after the region's last row.
 *
 *   load(path) -> None
 *   decode_region(data, denominator, x0, y0, x1, y1, out) -> None
 *
 * The library is not linked: `load` opens a libjpeg-turbo shared library with the libjpeg 6.2 ABI (the one
 * bundled with Pillow's wheels, or the system's libjpeg.so.62) and takes the nine functions used here from
 * it, so the build needs jpeglib.h only and the caller picks the fastest library present (rtrain.data.decode;
 * libjpeg-turbo 3.x decodes ImageNet-sized files ~4 % faster than Debian 12's 2.1.5). libjpeg itself checks
 * the ABI (version and struct size) in jpeg_CreateDecompress. OSError if the library or a function is missing.
 *
 * `denominator` (1, 2, 4, 8) scales the image by 1/denominator as libjpeg does (output size = ceil(size / d));
 * the region [x0, x1) x [y0, y1) is in those scaled pixels and must lie inside the scaled image. Its pixels
 * are written to `out` (a writable buffer of at least (y1 - y0) * (x1 - x0) * 3 bytes) as packed RGB rows,
 * (y1 - y0, x1 - x0, 3): the (h, w, 3) array torch's uint8 resize reads fastest. Fast integer IDCT and fast
 * (box) chroma upsampling, as in rtrain.data.decode. Raises ValueError for anything libjpeg refuses or finds
 * corrupt (the caller falls back), RuntimeError before a successful `load`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr base;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
    int warnings;
} ErrorManager;

static void on_error(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) {  /* a warning (corrupt data libjpeg could step over): refuse it, the caller decides */
        ErrorManager *err = (ErrorManager *)cinfo->err;
        if (!err->warnings++) (*cinfo->err->format_message)(cinfo, err->message);
    }
}

/* The functions taken from the loaded library. */
typedef struct {
    void *handle;
    struct jpeg_error_mgr *(*std_error)(struct jpeg_error_mgr *);
    void (*create_decompress)(j_decompress_ptr, int, size_t);
    void (*destroy_decompress)(j_decompress_ptr);
    void (*mem_src)(j_decompress_ptr, const unsigned char *, unsigned long);
    int (*read_header)(j_decompress_ptr, boolean);
    boolean (*start_decompress)(j_decompress_ptr);
    void (*crop_scanline)(j_decompress_ptr, JDIMENSION *, JDIMENSION *);
    JDIMENSION (*skip_scanlines)(j_decompress_ptr, JDIMENSION);
    JDIMENSION (*read_scanlines)(j_decompress_ptr, JSAMPARRAY, JDIMENSION);
} Library;

/* Set by load() while holding the GIL; a decode copies it first (under the GIL), and a replaced library is
 * never closed, so a decode running without the GIL keeps valid functions. */
static Library lib;

static PyObject *load(PyObject *self, PyObject *args) {
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        PyErr_Format(PyExc_OSError, "%s", dlerror());
        return NULL;
    }
    const char *names[] = {"jpeg_std_error", "jpeg_CreateDecompress", "jpeg_destroy_decompress", "jpeg_mem_src",
                           "jpeg_read_header", "jpeg_start_decompress", "jpeg_crop_scanline",
                           "jpeg_skip_scanlines", "jpeg_read_scanlines"};
    void *found[9];
    for (int i = 0; i < 9; i++) {
        found[i] = dlsym(handle, names[i]);
        if (!found[i]) {
            PyErr_Format(PyExc_OSError, "%s: no %s (not libjpeg-turbo >= 1.5?)", path, names[i]);
            dlclose(handle);
            return NULL;
        }
    }
    lib.handle = handle; /* a previously loaded library stays open (see `lib`) */
    lib.std_error = (struct jpeg_error_mgr * (*)(struct jpeg_error_mgr *)) found[0];
    lib.create_decompress = (void (*)(j_decompress_ptr, int, size_t))found[1];
    lib.destroy_decompress = (void (*)(j_decompress_ptr))found[2];
    lib.mem_src = (void (*)(j_decompress_ptr, const unsigned char *, unsigned long))found[3];
    lib.read_header = (int (*)(j_decompress_ptr, boolean))found[4];
    lib.start_decompress = (boolean(*)(j_decompress_ptr))found[5];
    lib.crop_scanline = (void (*)(j_decompress_ptr, JDIMENSION *, JDIMENSION *))found[6];
    lib.skip_scanlines = (JDIMENSION(*)(j_decompress_ptr, JDIMENSION))found[7];
    lib.read_scanlines = (JDIMENSION(*)(j_decompress_ptr, JSAMPARRAY, JDIMENSION))found[8];
    Py_RETURN_NONE;
}

#define ROWS_PER_READ 16

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    int denominator, x0, y0, x1, y1;
    const Library f = lib; /* under the GIL: see `lib` */
    if (!f.handle) {
        PyErr_SetString(PyExc_RuntimeError, "no libjpeg loaded (call load first)");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*iiiiiw*", &data, &denominator, &x0, &y0, &x1, &y1, &out)) return NULL;

    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    memset(&cinfo, 0, sizeof(cinfo));
    memset(&err, 0, sizeof(err));
    cinfo.err = f.std_error(&err.base);
    err.base.error_exit = on_error;
    err.base.emit_message = on_message;
    const char *volatile problem = NULL;
    unsigned char *volatile scratch = NULL; /* freed after a longjmp too */

    Py_BEGIN_ALLOW_THREADS
    if (setjmp(err.escape)) {
        problem = err.message;
    } else {
        f.create_decompress(&cinfo, JPEG_LIB_VERSION, sizeof(cinfo));
        f.mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
        f.read_header(&cinfo, TRUE);
        if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE) {
            problem = "not a YCbCr or grayscale JPEG";
        } else if (denominator != 1 && denominator != 2 && denominator != 4 && denominator != 8) {
            problem = "denominator must be 1, 2, 4 or 8";
        } else {
            cinfo.out_color_space = JCS_RGB;
            cinfo.scale_num = 1;
            cinfo.scale_denom = (unsigned int)denominator;
            cinfo.dct_method = JDCT_IFAST;
            cinfo.do_fancy_upsampling = FALSE;
            f.start_decompress(&cinfo);
            JDIMENSION scaled_w = (cinfo.image_width + (JDIMENSION)denominator - 1) / (JDIMENSION)denominator;
            JDIMENSION scaled_h = (cinfo.image_height + (JDIMENSION)denominator - 1) / (JDIMENSION)denominator;
            if (cinfo.output_width != scaled_w || cinfo.output_height != scaled_h) {
                problem = "libjpeg scaled to another size than ceil(size / denominator)";
            } else if (x0 < 0 || y0 < 0 || x1 > (int)cinfo.output_width || y1 > (int)cinfo.output_height ||
                       x0 >= x1 || y0 >= y1) {
                problem = "region outside the scaled image";
            } else if ((Py_ssize_t)(y1 - y0) * (x1 - x0) * 3 > out.len) {
                problem = "output buffer too small";
            } else {
                JDIMENSION left = (JDIMENSION)x0, width = (JDIMENSION)(x1 - x0);
                if (width < cinfo.output_width) f.crop_scanline(&cinfo, &left, &width);
                JDIMENSION stride = width * 3;
                scratch = (unsigned char *)malloc((size_t)stride * ROWS_PER_READ);
                if (!scratch) {
                    problem = "out of memory";
                } else {
                    JSAMPROW pointers[ROWS_PER_READ];
                    for (int i = 0; i < ROWS_PER_READ; i++) pointers[i] = scratch + (size_t)i * stride;
                    if (y0 > 0) f.skip_scanlines(&cinfo, (JDIMENSION)y0);
                    if (cinfo.output_scanline != (JDIMENSION)y0) problem = "could not skip to the region";
                    /* several rows per call: libjpeg then writes whole row groups in place (a one-row read of
                     * 4:2:0 data through the merged upsampler goes through a spare row and a copy) */
                    while (!problem && (int)cinfo.output_scanline < y1) {
                        int done = (int)cinfo.output_scanline - y0, want = y1 - (int)cinfo.output_scanline;
                        int got = (int)f.read_scanlines(&cinfo, pointers,
                                                          (JDIMENSION)(want < ROWS_PER_READ ? want : ROWS_PER_READ));
                        if (got == 0) {
                            problem = "premature end of data";
                            break;
                        }
                        /* the region's columns of the block-aligned rows, packed */
                        size_t row_bytes = (size_t)(x1 - x0) * 3, skip = (size_t)(x0 - (int)left) * 3;
                        for (int r = 0; r < got; r++)
                            memcpy((unsigned char *)out.buf + (size_t)(done + r) * row_bytes,
                                   scratch + (size_t)r * stride + skip, row_bytes);
                    }
                    if (!problem && err.warnings) problem = err.message;
                }
            }
        }
    }
    f.destroy_decompress(&cinfo);
    free(scratch);
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (problem) {
        PyErr_SetString(PyExc_ValueError, (const char *)problem);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"load", load, METH_VARARGS, "load(path) -> None: the libjpeg-turbo shared library to decode with"},
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, denominator, x0, y0, x1, y1, out) -> None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpeg_region(void) {
    PyObject *m = PyModule_Create(&module);
    /* the libjpeg ABI these headers describe (62: libjpeg.so.62, 80: libjpeg.so.8); load() needs a library of it */
    if (m && PyModule_AddIntConstant(m, "JPEG_LIB_VERSION", JPEG_LIB_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
